"""Writes a snapshot file back from a memory image and an envelope.

Runs of records are assembled in a buffer a chunk at a time: each stretch of same-kind records is
a ``(count, record size)`` view of that buffer, so headers and pages go in with two vectorized
assignments per stretch. Mapped-ram blocks are written with ``pwrite`` at their fixed offsets,
leaving holes where pages are zero, as QEMU's own files have them. The image is read a chunk at
a time, and each chunk is released from the image's map once written (``release``), so writing
holds one chunk of the image, not all of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np

from vmdelta_core.plugin import ArtifactStream, ConfigError, FormatError
from vmdelta_source_qemu.blocks import RamBlock
from vmdelta_source_qemu.c_migration import PAGE_SIZE, RamFlag
from vmdelta_source_qemu.envelope import Envelope, Mapped, Run
from vmdelta_source_qemu.imagefile import CHUNK_PAGES as _CHUNK_PAGES
from vmdelta_source_qemu.imagefile import page_nonzero as _nonzero
from vmdelta_source_qemu.imagefile import pwrite_all

__all__ = ["stream_snapshot", "write_snapshot"]

Release = Callable[[int, int], None]


def _keep(start: int, stop: int) -> None:
    """The default ``release``: the image is not a map whose pages can be dropped."""


_MAPPED_HEADER = 28
_MAPPED_ALIGN = 1 << 20


def write_snapshot(
    envelope: Envelope, blocks: Sequence[RamBlock], image: np.ndarray, out: BinaryIO, release: Release = _keep
) -> None:
    """Run the envelope's operations against ``image`` into ``out``.

    ``out`` is opened ``w+b``: mapped-ram blocks read their header back from it. The stream
    starts at ``out``'s position (a container's header may come first; a mapped-ram file must
    start its file) and the file ends where the stream does. ``release(start, stop)`` is called
    for each range of ``image`` once it is written.
    """
    fd = out.fileno()
    start = pos = out.tell()
    for op in envelope.ops:
        if isinstance(op, Run):
            block = _block(blocks, op.block)
            if op.first_page + op.count > block.pages:
                raise FormatError(f"QEMU envelope: a run past the end of block {block.name!r}")
            pos += _write_run(out, op, block, image, release)
        elif isinstance(op, Mapped):
            if start:
                raise FormatError(f"QEMU envelope: a mapped-ram block in a stream at offset {start} of its file")
            block = _block(blocks, op.block)
            out.flush()
            pos = _write_mapped(fd, pos, op, block, image, release)
            out.seek(pos)
        else:
            out.write(op)
            pos += len(op)
    out.flush()
    os.ftruncate(fd, pos)


def stream_snapshot(
    envelope: Envelope, blocks: Sequence[RamBlock], image: np.ndarray, out: ArtifactStream, release: Release = _keep
) -> None:
    """Write a migration stream front to back while ``image`` is still being rebuilt: each run of
    pages once ``out`` says the image is final that far, and the bytes after the last run (the
    device state and the end QEMU needs to complete the load) through ``out.finish``, which
    writes them only once everything is verified. ``release(start, stop)`` is called for each
    range of ``image`` once it is written, so that a map of it holds only what is in hand.

    :raises ConfigError: a mapped-ram file (written at fixed offsets, not front to back), or a
        stream without bytes after its pages.
    """
    ops = list(envelope.ops)
    if any(isinstance(op, Mapped) for op in ops):
        raise ConfigError("a mapped-ram snapshot is written at fixed offsets, not as a stream: write it to a file")
    last_run = max((k for k, op in enumerate(ops) if isinstance(op, Run)), default=-1)
    tail = b"".join(op for op in ops[last_run + 1 :] if isinstance(op, bytes))
    if not tail:
        raise ConfigError("this snapshot has no bytes after its pages to hold back: write it to a file")
    for op in ops[: last_run + 1]:
        if isinstance(op, Run):
            block = _block(blocks, op.block)
            if op.first_page + op.count > block.pages:
                raise FormatError(f"QEMU envelope: a run past the end of block {block.name!r}")
            _write_run(out, op, block, image, release, ready=out.wait_image)  # type: ignore[arg-type]
        else:
            out.write(op)
    out.finish(tail)


def _block(blocks: Sequence[RamBlock], index: int) -> RamBlock:
    if not 0 <= index < len(blocks):
        raise FormatError(f"QEMU envelope names RAM block {index}, the layout has {len(blocks)}")
    return blocks[index]


def _write_run(
    out: BinaryIO, run: Run, block: RamBlock, image: np.ndarray, release: Release, ready: Release | None = None
) -> int:
    """The run's records, a chunk at a time; ``ready(end)`` first waits for the image to be final
    up to the chunk's end, when it is still being rebuilt."""
    forced = run.forced_mask()
    name = block.name.encode("latin-1")
    written = 0
    for first in range(0, run.count, _CHUNK_PAGES):
        count = min(_CHUNK_PAGES, run.count - first)
        page0 = run.first_page + first
        at = block.offset + page0 * PAGE_SIZE
        if ready is not None:
            ready(at + count * PAGE_SIZE)
        pages = image[at : at + count * PAGE_SIZE].reshape(count, PAGE_SIZE)
        is_page = _nonzero(pages) | forced[first : first + count]
        flags = np.where(is_page, int(RamFlag.PAGE), int(RamFlag.ZERO)).astype(np.uint64)
        headers = (np.arange(page0, page0 + count, dtype=np.uint64) * np.uint64(PAGE_SIZE)) | flags
        lead = b""
        if run.named and first == 0:
            # the run's first record names its block instead of continuing the previous one
            lead = int(headers[0]).to_bytes(8, "big") + bytes([len(name)]) + name
            lead += pages[0].tobytes() if is_page[0] else b"\0"
            pages, is_page, headers = pages[1:], is_page[1:], headers[1:]
        headers |= np.uint64(RamFlag.CONTINUE)
        sizes = np.where(is_page, 8 + PAGE_SIZE, 8 + 1)
        buf = np.empty(len(lead) + int(sizes.sum()), np.uint8)
        buf[: len(lead)] = np.frombuffer(lead, np.uint8)
        head_bytes = headers.astype(">u8").view(np.uint8).reshape(-1, 8)
        cut = np.flatnonzero(np.diff(is_page.astype(np.int8))) + 1
        starts = np.concatenate(([0], cut)).tolist()
        stops = np.concatenate((cut, [is_page.shape[0]])).tolist()
        offsets = len(lead) + np.concatenate(([0], np.cumsum(sizes)))
        for a, b in zip(starts, stops, strict=True):
            if a == b:
                continue
            size = int(sizes[a])
            region = buf[int(offsets[a]) : int(offsets[b])].reshape(b - a, size)
            region[:, :8] = head_bytes[a:b]
            if size == 8 + 1:
                region[:, 8] = 0
            else:
                region[:, 8:] = pages[a:b]
        out.write(buf)  # type: ignore[arg-type]
        written += buf.shape[0]
        release(at, at + count * PAGE_SIZE)
    return written


def _write_mapped(fd: int, pos: int, op: Mapped, block: RamBlock, image: np.ndarray, release: Release) -> int:
    """Bitmap at ``pos`` (right after the block's header), pages at the offset the header names."""
    header = os.pread(fd, _MAPPED_HEADER, pos - _MAPPED_HEADER) if pos >= _MAPPED_HEADER else b""
    if len(header) != _MAPPED_HEADER:
        raise FormatError(f"QEMU envelope: no mapped-ram header before offset {pos} for block {block.name!r}")
    bitmap_offset = int.from_bytes(header[12:20], "big")
    pages_offset = int.from_bytes(header[20:28], "big")
    # QEMU puts the pages at the first 1 MiB boundary after the bitmap, which bounds the gap
    bitmap_end = pos + (block.pages + 63) // 64 * 8
    if bitmap_offset != pos or not bitmap_end <= pages_offset <= -(-bitmap_end // _MAPPED_ALIGN) * _MAPPED_ALIGN:
        raise FormatError(f"QEMU envelope: mapped-ram header of block {block.name!r} does not match its position")
    pages = image[block.offset : block.offset + block.length].reshape(block.pages, PAGE_SIZE)
    bits = np.zeros(block.pages, bool)
    for first in range(0, block.pages, _CHUNK_PAGES):
        bits[first : first + _CHUNK_PAGES] = _nonzero(pages[first : first + _CHUNK_PAGES])
        release(block.offset + first * PAGE_SIZE, block.offset + min(first + _CHUNK_PAGES, block.pages) * PAGE_SIZE)
    bits |= op.forced_mask(block.pages)
    words = (block.pages + 63) // 64 * 8
    bitmap = np.zeros(words, np.uint8)
    packed = np.packbits(bits, bitorder="little")
    bitmap[: packed.shape[0]] = packed
    os.pwrite(fd, bitmap.tobytes(), bitmap_offset)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], bits, [False])).astype(np.int8))).reshape(-1, 2)
    for start, stop in edges.tolist():
        for first in range(start, stop, _CHUNK_PAGES):
            last = min(first + _CHUNK_PAGES, stop)
            at = block.offset + first * PAGE_SIZE
            pwrite_all(fd, image[at : block.offset + last * PAGE_SIZE], pages_offset + first * PAGE_SIZE)
            release(at, block.offset + last * PAGE_SIZE)
    return pages_offset + block.length
