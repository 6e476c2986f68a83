"""Memory contexts for the freepfn tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vmdelta_core.plugin import FilterContext, SourceImage


def memory_context(
    base: np.ndarray, modified: np.ndarray, free: Path | None, layout: dict[str, Any] | None = None, **options: Any
) -> FilterContext:
    if layout is None:
        layout = {"blocks": [{"name": "pc.ram", "offset": 0, "length": int(modified.size), "guest_address": 0}]}
    return FilterContext(
        image_name="memory",
        kind="memory",
        unit_size=4096,
        base=SourceImage("memory", base, layout=layout),
        modified=SourceImage("memory", modified, layout=layout),
        input=free,
        options=options,
    )


def huge_zero_image(size: int) -> np.ndarray:
    """A read-only all-zero image of any size that costs no memory (stride 0)."""
    return np.broadcast_to(np.zeros(1, dtype=np.uint8), (size,))


def changed_units(base: np.ndarray, modified: np.ndarray) -> np.ndarray:
    n = modified.size // 4096
    return np.flatnonzero((base[: n * 4096].reshape(n, 4096) != modified[: n * 4096].reshape(n, 4096)).any(1))


def pfn_set(path: Path) -> set[int]:
    out: set[int] = set()
    for line in path.read_text().split("\n"):
        if line.strip():
            start, count = map(int, line.split())
            out.update(range(start, start + count))
    return out
