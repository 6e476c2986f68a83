"""Contexts over real or synthetic images for the trim tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmdelta_core.plugin import FilterContext, SourceImage, map_readonly


def disk_context(base: Path, modified: Path, trace: Path | None, **options: object) -> FilterContext:
    b, _ = map_readonly(base)
    m, _ = map_readonly(modified)
    return FilterContext(
        image_name="disk0",
        kind="disk",
        unit_size=4096,
        base=SourceImage("disk", b),
        modified=SourceImage("disk", m),
        input=trace,
        options=dict(options),
    )


def array_context(size: int, trace: Path | None, unit: int = 4096, **options: object) -> FilterContext:
    data = np.zeros(size, dtype=np.uint8)
    return FilterContext(
        "disk0", "disk", unit, SourceImage("disk", data), SourceImage("disk", data), trace, dict(options)
    )


def changed_units(ctx: FilterContext) -> np.ndarray:
    n = ctx.modified.size // ctx.unit_size
    b = ctx.base.data[: n * ctx.unit_size].reshape(n, ctx.unit_size)
    m = ctx.modified.data[: n * ctx.unit_size].reshape(n, ctx.unit_size)
    return np.flatnonzero((b != m).any(axis=1)).astype(np.int64)
