"""Helpers shared by the tests of vmdelta-source-qemu."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from vmdelta_source_qemu import QemuSource

from vmdelta_core.plugin import RebuiltImage, SourceImage


def rebuilt_image(image: SourceImage, raw: Path, side_outputs: Mapping[str, Path] | None = None) -> RebuiltImage:
    """What apply hands ``materialize`` for ``image``, rebuilt into the raw file ``raw``, its side
    files going to ``side_outputs``."""
    return RebuiltImage(
        path=raw,
        size=image.size,
        unit_size=4096,
        envelope=image.envelope,
        layout=image.layout,
        changed=np.zeros(0, np.int64),
        base=image,
        base_path=raw,
        side_outputs=dict(side_outputs or {}),
    )


def rebuild(
    image: SourceImage, folder: Path, side_outputs: Mapping[str, Path] | None = None, data: np.ndarray | None = None
) -> Path:
    """Materialize ``image`` (or ``data`` laid out like it) as the core's apply would."""
    raw = folder / "rebuilt.raw"
    raw.write_bytes((image.data if data is None else data).tobytes())
    out = folder / "rebuilt.mem"
    QemuSource().materialize(rebuilt_image(image, raw, side_outputs), out)
    return out
