"""The typed API for embedding vmdelta: build a config, call a function, get a report back.

Each function's pipeline is imported when the function is first asked for (``apply`` does not
load ``create``, nor the command line the pipelines behind the commands it does not run).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vmdelta_core.config import ApplyConfig, ApplyImageSpec, CreateConfig, FilterSpec, ImageSpec, load_pipeline

if TYPE_CHECKING:
    from vmdelta_core.apply import apply_overlay
    from vmdelta_core.batch import BatchReport, Fleet, VmSpec, batch
    from vmdelta_core.create import create_overlay
    from vmdelta_core.interop import ExportReport, ImportReport, export_elijah, import_elijah

#: the module each name comes from, imported by :func:`__getattr__` on first use
_LAZY = {
    "apply_overlay": "vmdelta_core.apply",
    "create_overlay": "vmdelta_core.create",
    **dict.fromkeys(("BatchReport", "Fleet", "VmSpec", "batch"), "vmdelta_core.batch"),
    **dict.fromkeys(("ExportReport", "ImportReport", "export_elijah", "import_elijah"), "vmdelta_core.interop"),
}

__all__ = [
    "ApplyConfig",
    "ApplyImageSpec",
    "BatchReport",
    "CreateConfig",
    "ExportReport",
    "FilterSpec",
    "Fleet",
    "ImageSpec",
    "ImportReport",
    "VmSpec",
    "apply_overlay",
    "batch",
    "create_overlay",
    "export_elijah",
    "import_elijah",
    "inspect_overlay",
    "load_pipeline",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmdelta_core.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def inspect_overlay(path: Path, *, verify: bool = True, stream: BinaryIO | None = None) -> dict[str, Any]:
    """The overlay's metadata and frame index as plain data (what ``vmdelta inspect --json`` prints).

    An overlay file of either form is read through its index (``verify`` checks every byte
    first); a stream (``stream``, standard input) is read to its end, which checks it.
    """
    from vmdelta_core.apply.feed import FileFeed, open_feed
    from vmdelta_core.overlay.metadata import OverlayMetadata

    feed = open_feed(Path(path), stream)
    try:
        if isinstance(feed, FileFeed):
            reader = feed.reader
            if verify:
                reader.verify()
            entries, document, size = reader.frames, reader.metadata, reader.size
            form = "stream" if reader.stream_form else "file"
        else:
            entries = []
            while (frame := feed.reader.next_frame()) is not None:
                entries.append(frame[0])
            document, size, form = feed.finish(), feed.reader.offset, "stream"
        OverlayMetadata.from_json(document, entries)
    finally:
        feed.close()
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
        for f in entries
    ]
    return {"file": str(path), "form": form, "size": size, "metadata": document, "frames": frames}
