"""Rewriting an overlay in the other form of container v1 (``schemas/overlay-v1-stream.md``).

Every stored frame is copied as it is, never decompressed, and the metadata document is the same,
so converting a file to the stream form and back gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from vmdelta_core.errors import FormatError
from vmdelta_core.overlay.container import FrameEntry, OverlayReader, OverlayWriter
from vmdelta_core.overlay.parts import split_document
from vmdelta_core.overlay.stream import StreamReader

__all__ = ["convert_overlay"]


def convert_overlay(source: OverlayReader | StreamReader, output: BinaryIO, *, stream: bool) -> int:
    """Write the overlay ``source`` reads to ``output``, in the stream form if ``stream`` and in
    the file form otherwise (either may be the form it already has).

    An :class:`OverlayReader` (a regular file of either form) is verified whole before anything
    is written. A :class:`StreamReader` that has given no frame yet is read in one pass, each
    frame written as soon as it is checked, so ``output`` holds an unfinished overlay if the end
    of the stream does not check: write to a temporary file, or let the next reader refuse it.
    ``output`` is written front to back only (it may be a pipe).

    :returns: the size of the overlay written, in bytes.
    :raises FormatError, IntegrityError: the source is damaged.
    """
    if isinstance(source, OverlayReader):
        source.verify()  # before the first byte is written
        prologue = _prologue(source.metadata, str(source.path))
        frames: Iterator[tuple[FrameEntry, bytes]] = ((e, source.stored(e)) for e in source.frames)
    else:
        if source.metadata is not None:
            raise ValueError(f"{source.name}: its frames were read before the conversion")
        prologue = _prologue(source.prologue, source.name)
        frames = iter(source.next_frame, None)
    writer = OverlayWriter.copying(output, stream=stream)
    writer.begin(prologue)
    for entry, stored in frames:
        writer.add_stored(entry, stored)
    assert source.metadata is not None  # next_frame gives None only once the end is checked
    size = writer.finish(source.metadata)
    output.flush()
    return size


def _prologue(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The prologue of ``document``, a whole metadata document or a stream's prologue (its own
    prologue), once its shape lets it be split; its content is for the readers to check."""
    images = document.get("images")
    if not isinstance(images, list) or not all(isinstance(image, dict) for image in images):
        raise FormatError(f"{name}: overlay metadata does not list its images")
    return split_document(document)[0]
