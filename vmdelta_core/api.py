"""The typed API for embedding vmdelta: build a config, call a function, get a report back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmdelta_core.apply import apply_overlay
from vmdelta_core.config import ApplyConfig, ApplyImageSpec, CreateConfig, FilterSpec, ImageSpec, load_pipeline
from vmdelta_core.create import create_overlay
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.metadata import OverlayMetadata

__all__ = [
    "ApplyConfig",
    "ApplyImageSpec",
    "CreateConfig",
    "FilterSpec",
    "ImageSpec",
    "apply_overlay",
    "create_overlay",
    "inspect_overlay",
    "load_pipeline",
]


def inspect_overlay(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """The overlay's metadata and frame index as plain data (what ``vmdelta inspect --json`` prints)."""
    with OverlayReader(Path(path)) as reader:
        if verify:
            reader.verify()
        OverlayMetadata.from_json(reader.metadata, reader.frames)
        frames = [
            {
                "offset": f.file_offset,
                "stored": f.stored_length,
                "length": f.length,
                "image": f.image,
                "kind": f.kind,
                "codec": f.codec,
                "items": f.item_count,
                "first": f.first_offset,
                "end": f.end_offset,
            }
            for f in reader.frames
        ]
        return {"file": str(path), "size": reader.size, "metadata": reader.metadata, "frames": frames}
