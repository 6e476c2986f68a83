"""QEMU migration streams inside other files: the public API for sources of container formats.

Some tools wrap QEMU's migration stream in a file of their own: a libvirt save image puts a
header and the domain XML before it, and may compress it. A source for such a format hands the
stream to these functions rather than parsing it itself, and keeps what surrounds the stream in
its own envelope:

* :func:`is_stream` tells whether bytes begin a migration stream (the ``QEVM`` magic);
* :func:`open_stream` reads the stream that starts ``start`` bytes into a file and runs to its
  end, as the :class:`SourceImage` the ``qemu`` source gives for the bare stream;
* :func:`write_stream` writes that stream back from its envelope and a rebuilt image, at the
  current position of an open file;
* :func:`ram_limit` reads the ``max_ram`` option as the ``qemu`` source does, for a container
  that bounds what it decompresses by it.

The image, ``envelope`` and ``layout`` are the ``qemu`` source's own, so the memory image of a
wrapped stream is the one the bare stream gives: filters that read ``layout["blocks"]`` work
unchanged, and the envelope compresses against the base's as well. Everything this module names
is kept stable for other distributions; the rest of the package is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vmdelta_core.plugin import ConfigError, ImageKind, SourceImage, map_readonly, release_pages
from vmdelta_source_qemu.envelope import read_envelope
from vmdelta_source_qemu.reader import ram_limit, read_snapshot
from vmdelta_source_qemu.writer import write_snapshot

__all__ = ["STREAM_MAGIC", "is_stream", "open_stream", "ram_limit", "rebuilt_image", "write_stream"]

#: the first four bytes of every QEMU migration stream and mapped-ram file
STREAM_MAGIC = b"QEVM"


def is_stream(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file or of a decompressed stream) begins a QEMU
    migration stream."""
    return head[:4] == STREAM_MAGIC


def open_stream(
    path: Path, *, start: int = 0, options: Mapping[str, Any] | None = None, kind: ImageKind = "memory"
) -> SourceImage:
    """Read the QEMU migration stream that begins ``start`` bytes into ``path`` and ends with it.

    ``options`` are the ``qemu`` source's (``tmpdir``, ``max_ram``; ``ram`` for the RAM file of
    an x-ignore-shared stream). A stream that does not end exactly at the end of the file is
    refused like a bare one: a container whose stream is followed by bytes of its own gives it a
    file of its own. A mapped-ram file that does not start at offset 0 is refused (its pages sit
    at offsets counted from the file's first byte).

    :raises FormatError: not a stream QEMU 7.2-10.x writes, or damaged (one line, naming the
        offset in the stream).
    """
    snap = read_snapshot(Path(path), options or {}, start)
    return SourceImage(
        kind=kind,
        data=snap.image,
        holes=snap.holes,
        envelope=snap.envelope.to_bytes(),
        layout=snap.layout,
        exact_artifact=snap.exact,
        mapping=snap.mapping,
        closers=snap.closers,
    )


@contextlib.contextmanager
def rebuilt_image(path: Path) -> Iterator[tuple[np.ndarray, Callable[[int, int], None]]]:
    """The rebuilt raw image at ``path`` as a read-only array, and a function that releases a
    range of it from this process once written; closed on exit."""
    image, closers = map_readonly(Path(path))
    mapping = closers[0] if closers else None

    def release(start: int, stop: int) -> None:
        release_pages(mapping, start, stop)  # type: ignore[arg-type]

    try:
        yield image, release
    finally:
        del image
        for closer in closers:
            with contextlib.suppress(BufferError):
                closer.close()  # type: ignore[attr-defined]


def write_stream(envelope: bytes, image: Path, size: int, out: BinaryIO) -> None:
    """Write the stream of ``envelope`` (an :func:`open_stream` envelope, untrusted: it comes
    from an overlay) with the pages of the rebuilt raw image file ``image`` (``size`` bytes)
    into ``out``, from its current position; the file then ends where the stream does.

    ``out`` must be opened ``w+b`` (or ``r+b``). The image is read a chunk at a time, each chunk
    released once written.

    :raises FormatError: an envelope that does not fit the image.
    :raises ConfigError: an x-ignore-shared stream, whose RAM lives in a file of its own.
    """
    checked = read_envelope(envelope, size)
    if checked.external is not None:
        raise ConfigError(
            f"the stream was saved with x-ignore-shared: block {checked.external.name!r} lives in a RAM file, "
            "which a stream inside another file cannot name"
        )
    with rebuilt_image(image) as (data, release):
        write_snapshot(checked.envelope, checked.blocks, data, out, release)
