"""The typed API for embedding vmdelta: build a config, call a function, get a report back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from vmdelta_core.apply import apply_overlay
from vmdelta_core.apply.feed import FileFeed, open_feed
from vmdelta_core.batch import BatchReport, Fleet, VmSpec, batch
from vmdelta_core.config import ApplyConfig, ApplyImageSpec, CreateConfig, FilterSpec, ImageSpec, load_pipeline
from vmdelta_core.create import create_overlay
from vmdelta_core.interop import ExportReport, ImportReport, export_elijah, import_elijah
from vmdelta_core.overlay.metadata import OverlayMetadata

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


def inspect_overlay(path: Path, *, verify: bool = True, stream: BinaryIO | None = None) -> dict[str, Any]:
    """The overlay's metadata and frame index as plain data (what ``vmdelta inspect --json`` prints).

    An overlay file of either form is read through its index (``verify`` checks every byte
    first); a stream (``stream``, standard input) is read to its end, which checks it.
    """
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
