"""From a parsed snapshot to what the core diffs: image, zero extents, envelope, layout.

The image is built in an unlinked sparse temporary file (:mod:`~vmdelta_source_qemu.imagefile`),
so pages a snapshot never holds (ZERO records, mapped-ram holes, unsent pages) cost nothing and
pages with data do not stay in this process's memory: the snapshot is read through a map whose
pages are released as they are parsed, and the image is handed to the core as a read-only map of
the file (``SourceImage.mapping``) that the core releases as it reads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from vmdelta_core.errors import ConfigError
from vmdelta_core.fileio import data_extents, hole_extents, map_readonly
from vmdelta_source_qemu.blocks import RamBlock, layout_of
from vmdelta_source_qemu.c_migration import PAGE_SIZE
from vmdelta_source_qemu.envelope import Envelope, Mapped, Op, Run, pack_forced
from vmdelta_source_qemu.imagefile import CHUNK_PAGES, ImageFile, page_nonzero, release_range
from vmdelta_source_qemu.scan import KIND_PAGE
from vmdelta_source_qemu.stream import ParsedStream, parse_stream

__all__ = ["Snapshot", "page_runs", "read_snapshot"]


@attrs.define(eq=False)
class Snapshot:
    image: np.ndarray
    holes: np.ndarray
    envelope: Envelope
    layout: dict[str, Any]
    exact: bool
    #: the read-only map ``image`` views (``None`` for an empty image)
    mapping: Any
    closers: list[Any]


def page_runs(mask: np.ndarray) -> np.ndarray:
    """``(n, 2)`` start/stop pairs of the runs of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return edges.reshape(-1, 2)


def read_snapshot(path: Path, options: Mapping[str, Any]) -> Snapshot:
    """Open a QEMU migration stream or mapped-ram file; ``options["ram"]`` names the RAM file of an
    x-ignore-shared stream, ``options["tmpdir"]`` where the image file goes."""
    buf, stream_closers = map_readonly(path)
    stream_map = stream_closers[0] if stream_closers else None
    try:
        parsed = parse_stream(buf, stream_map, options.get("tmpdir"))
        try:
            snap = _snapshot(path, buf, stream_map, parsed, options)
        except BaseException:
            parsed.image.close()
            raise
    finally:
        del buf
        for closer in stream_closers:
            with contextlib.suppress(BufferError):
                closer.close()  # type: ignore[attr-defined]
    return snap


def _snapshot(
    path: Path, buf: np.ndarray, stream_map: Any, parsed: ParsedStream, options: Mapping[str, Any]
) -> Snapshot:
    image = parsed.image
    exact = True
    known_zero = np.ones(image.size // PAGE_SIZE, bool)
    mapped_bits: dict[int, np.ndarray] = {}
    if parsed.fmt == "mapped-ram":
        exact = _fill_mapped(path, buf, stream_map, parsed, mapped_bits, known_zero)
    else:
        t = parsed.table
        written = parsed.last_write >= 0
        data_pages = np.zeros_like(known_zero)
        if len(t):
            lw = parsed.last_write[written]
            data_pages[written] = (t.kind[lw] == KIND_PAGE) | (t.fill[lw] != 0)
        known_zero = ~data_pages
    external = _fill_external(parsed, options, known_zero)
    nonzero = image.nonzero
    ops = (
        _mapped_ops(parsed, buf, mapped_bits, nonzero)
        if parsed.fmt == "mapped-ram"
        else _stream_ops(parsed, buf, nonzero)
    )
    meta = {
        "format": parsed.fmt,
        "blocks": [[b.name, b.offset, b.length] for b in parsed.blocks],
        "external": external,
    }
    layout = layout_of(
        parsed.blocks,
        parsed.fmt,
        ignore_shared=parsed.ignore_shared,
        machine=parsed.machine,
        capabilities=parsed.capabilities,
        ram_file_blocks=external,
    )
    runs = page_runs(known_zero) * PAGE_SIZE
    holes = np.stack([runs[:, 0], runs[:, 1] - runs[:, 0]], axis=1).astype(np.int64).reshape(-1, 2)
    data, mapping = image.finish()
    closers = [] if mapping is None else [mapping]
    return Snapshot(data, holes, Envelope(meta, ops), layout, exact, mapping, closers)


def _fill_mapped(
    path: Path,
    buf: np.ndarray,
    stream_map: Any,
    parsed: ParsedStream,
    bits_out: dict[int, np.ndarray],
    known_zero: np.ndarray,
) -> bool:
    """Copy the pages a mapped-ram file marks as written; tell whether the file is canonical
    (nothing outside the bitmap, the bitmap padding and the gaps all zero)."""
    exact = True
    for index, block in enumerate(parsed.blocks):
        assert block.mapped is not None
        npages = block.pages
        nbytes = (npages + 63) // 64 * 8
        raw_bits = np.unpackbits(
            buf[block.mapped.bitmap_offset : block.mapped.bitmap_offset + nbytes], bitorder="little"
        )
        bits = raw_bits[:npages].astype(bool)
        exact &= not raw_bits[npages:].any()
        exact &= not buf[block.mapped.bitmap_offset + nbytes : block.mapped.pages_offset].any()
        release_range(stream_map, block.mapped.bitmap_offset, block.mapped.pages_offset)
        bits_out[index] = bits
        pages_at = block.mapped.pages_offset
        for start, stop in page_runs(bits).tolist():
            for first in range(start, stop, CHUNK_PAGES):
                last = min(first + CHUNK_PAGES, stop)
                at = pages_at + first * PAGE_SIZE
                pages = buf[at : pages_at + last * PAGE_SIZE].reshape(-1, PAGE_SIZE)
                parsed.image.write_pages(block.first_page + first, pages)
                release_range(stream_map, at, pages_at + last * PAGE_SIZE)
        known_zero[block.first_page : block.first_page + npages] = ~bits
        # data QEMU left in pages it did not mark (it never does after a single save) is lost
        for start, length in data_extents(path, pages_at, pages_at + block.length).tolist():
            first, last = (start - pages_at) // PAGE_SIZE, -(-(start + length - pages_at) // PAGE_SIZE)
            stale = ~bits[first:last]
            if stale.any():
                pages = buf[pages_at + first * PAGE_SIZE : pages_at + last * PAGE_SIZE].reshape(-1, PAGE_SIZE)
                exact &= not pages[stale].any()
                release_range(stream_map, pages_at + first * PAGE_SIZE, pages_at + last * PAGE_SIZE)
    return bool(exact)


def _fill_external(parsed: ParsedStream, options: Mapping[str, Any], known_zero: np.ndarray) -> list[str]:
    """x-ignore-shared: the blocks the stream holds no page of come from the user's RAM file."""
    if not parsed.ignore_shared:
        if options.get("ram"):
            raise ConfigError("a RAM file was given (--memory-ram), but the stream was not saved with x-ignore-shared")
        return []
    empty = [b for b in parsed.blocks if not (parsed.last_write[b.first_page : b.first_page + b.pages] >= 0).any()]
    if not empty:
        return []
    names = [b.name for b in empty]
    ram = options.get("ram")
    if not ram:
        raise ConfigError(
            f"the stream was saved with x-ignore-shared: RAM block {names[0]!r} is not in it; name its RAM file "
            "with --memory-ram"
        )
    if len(empty) > 1:
        raise ConfigError(
            f"the stream leaves several shared RAM blocks out ({', '.join(names)}); one RAM file is supported"
        )
    _copy_raw(Path(ram), empty[0], parsed.image, known_zero, parsed.fmt == "mapped-ram")
    return names


def _copy_raw(path: Path, block: RamBlock, image: ImageFile, known_zero: np.ndarray, mapped: bool) -> None:
    """The RAM file becomes the block's range of the image (mapped there, or copied in)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot read the RAM file {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size != block.length:
            raise ConfigError(f"RAM file {path} is {size} bytes, but block {block.name!r} is {block.length}")
        extents = data_extents(path)
        image.map_file(fd, block.offset, block.length, extents)
        if mapped:
            _raw_nonzero(fd, extents, block, image)
    finally:
        os.close(fd)
    zero = np.zeros(block.pages, bool)
    for start, length in hole_extents(path).tolist():
        zero[-(-start // PAGE_SIZE) : (start + length) // PAGE_SIZE] = True
    known_zero[block.first_page : block.first_page + block.pages] = zero


def _raw_nonzero(fd: int, extents: np.ndarray, block: RamBlock, image: ImageFile) -> None:
    """Which pages of a block copied from a RAM file hold data (a mapped-ram envelope needs it;
    a stream's does not, as no record names the block)."""
    image.nonzero[block.first_page : block.first_page + block.pages] = False
    step = CHUNK_PAGES * PAGE_SIZE
    for start, length in extents.tolist():
        first, stop = start - start % PAGE_SIZE, -(-(start + length) // PAGE_SIZE) * PAGE_SIZE
        for at in range(first, stop, step):
            chunk = np.frombuffer(os.pread(fd, min(step, stop - at), at), np.uint8)
            page = block.first_page + at // PAGE_SIZE
            image.nonzero[page : page + chunk.shape[0] // PAGE_SIZE] |= page_nonzero(chunk.reshape(-1, PAGE_SIZE))


def _stream_ops(parsed: ParsedStream, buf: np.ndarray, nonzero: np.ndarray) -> list[Op]:
    """Runs for every record the image stands for, the bytes in between verbatim."""
    t = parsed.table
    n = len(t)
    specials: list[tuple[int, int, Op]] = []
    if n:
        first_pages = np.array([b.first_page for b in parsed.blocks], np.int64)
        gpage = first_pages[t.block] + t.page
        final = parsed.last_write[gpage] == np.arange(n)
        fits = final & ((t.kind == KIND_PAGE) | (t.fill == 0))
        cont = np.zeros(n, bool)
        cont[1:] = (
            fits[1:]
            & fits[:-1]
            & ~t.named[1:]
            & (t.block[1:] == t.block[:-1])
            & (t.page[1:] == t.page[:-1] + 1)
            & (t.pos[1:] == t.end[:-1])
        )
        forced = (t.kind == KIND_PAGE) & ~nonzero[gpage]
        fit_idx = np.flatnonzero(fits)
        heads = np.flatnonzero(~cont[fit_idx])
        bounds = np.append(heads, fit_idx.shape[0])
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            first, last = int(fit_idx[a]), int(fit_idx[b - 1])
            run = Run(
                int(t.block[first]),
                int(t.page[first]),
                b - a,
                bool(t.named[first]),
                pack_forced(forced[first : last + 1]),
            )
            specials.append((int(t.pos[first]), int(t.end[last]), run))
    return _fill_gaps(specials, buf)


def _mapped_ops(parsed: ParsedStream, buf: np.ndarray, bits: dict[int, np.ndarray], nonzero: np.ndarray) -> list[Op]:
    specials: list[tuple[int, int, Op]] = []
    for index, block in enumerate(parsed.blocks):
        assert block.mapped is not None
        forced = bits[index] & ~nonzero[block.first_page : block.first_page + block.pages]
        specials.append(
            (block.mapped.bitmap_offset, block.mapped.pages_offset + block.length, Mapped(index, pack_forced(forced)))
        )
    return _fill_gaps(specials, buf)


def _fill_gaps(specials: list[tuple[int, int, Op]], buf: np.ndarray) -> list[Op]:
    ops: list[Op] = []
    pos = 0
    for start, stop, op in sorted(specials, key=lambda s: s[0]):
        if start > pos:
            ops.append(buf[pos:start].tobytes())
        ops.append(op)
        pos = stop
    if pos < buf.shape[0]:
        ops.append(buf[pos:].tobytes())
    return ops
