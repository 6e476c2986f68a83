"""From a parsed snapshot to what the core diffs: image, zero extents, envelope, layout.

The image is built in an unlinked sparse temporary file (:mod:`~vmdelta_source_qemu.imagefile`),
so pages a snapshot never holds (ZERO records, mapped-ram holes, unsent pages) cost nothing and
pages with data do not stay in this process's memory: the snapshot is read through a map whose
pages are released as they are parsed, and the image is handed to the core as a read-only map of
the file (``SourceImage.mapping``) that the core releases as it reads.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from vmdelta_core.plugin import ConfigError, FormatError, data_extents, map_readonly, release_pages
from vmdelta_source_qemu.blocks import layout_of
from vmdelta_source_qemu.c_migration import PAGE_SIZE
from vmdelta_source_qemu.envelope import Envelope, Mapped, Op, Run, pack_forced
from vmdelta_source_qemu.imagefile import CHUNK_PAGES, page_nonzero
from vmdelta_source_qemu.pageruns import bitmap_runs, intersect, merge, pack_runs, runs_of, subtract, uncovered
from vmdelta_source_qemu.scan import KIND_PAGE
from vmdelta_source_qemu.stream import DEFAULT_MAX_RAM, ParsedStream, parse_stream

__all__ = ["Snapshot", "ram_limit", "read_snapshot"]


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


def ram_limit(options: Mapping[str, Any]) -> int:
    """The ``max_ram`` option: the most RAM a block table may claim, in bytes."""
    value = options.get("max_ram", DEFAULT_MAX_RAM)
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if isinstance(value, bool | float) or limit <= 0:
        raise ConfigError(f"max_ram {value!r} is not a positive whole number of bytes")
    return limit


def read_snapshot(path: Path, options: Mapping[str, Any], start: int = 0) -> Snapshot:
    """Open a QEMU migration stream or mapped-ram file; ``options["ram"]`` names the RAM file of an
    x-ignore-shared stream, ``options["tmpdir"]`` where the image file goes, ``options["max_ram"]``
    the most RAM its block table may claim.

    ``start`` is where the stream begins in the file (a container's header before it); it runs
    to the end of the file. Mapped-ram files address their pages from the file's first byte, so
    one that does not start there is refused.
    """
    max_ram = ram_limit(options)
    buf, stream_closers = map_readonly(path) if start == 0 else _map_from(path, start)
    stream_map = stream_closers[0] if stream_closers else None
    try:
        parsed = parse_stream(buf, stream_map, options.get("tmpdir"), max_ram)
        try:
            if start and parsed.fmt == "mapped-ram":
                raise FormatError(f"a mapped-ram file starts its file; this one starts at offset {start} of {path}")
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


class _ShiftedMap:
    """A read-only map of a file from a page boundary at or before a stream's first byte, seen
    from that byte: :func:`release_pages` hands it offsets in the stream, this drops the pages
    under them from the map (whole pages only, as ``madvise`` needs)."""

    def __init__(self, mapping: mmap.mmap, shift: int) -> None:
        self.mapping = mapping
        self.shift = shift

    def __len__(self) -> int:
        return len(self.mapping) - self.shift

    def madvise(self, option: int, start: int, length: int) -> None:
        lo = start + self.shift
        hi = min(lo + length, len(self.mapping))
        lo -= lo % mmap.PAGESIZE
        if hi > lo:
            self.mapping.madvise(option, lo, hi - lo)

    def close(self) -> None:
        self.mapping.close()


def _map_from(path: Path, start: int) -> tuple[np.ndarray, list[Any]]:
    """The file from byte ``start`` to its end as a read-only array, and what to close."""
    if start < 0:
        raise ValueError(f"a stream cannot start at offset {start}")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size <= start:
            return np.zeros(0, dtype=np.uint8), []
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, size - base, prot=mmap.PROT_READ, offset=base)
    except OSError as exc:
        raise ConfigError(f"cannot map {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    with contextlib.suppress(AttributeError, OSError):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(mapped, dtype=np.uint8)[start - base :], [_ShiftedMap(mapped, start - base)]


def _snapshot(
    path: Path, buf: np.ndarray, stream_map: Any, parsed: ParsedStream, options: Mapping[str, Any]
) -> Snapshot:
    """Everything is kept per record or per run of pages, never per page of the image: a stream
    whose block table claims terabytes costs what it holds."""
    image = parsed.image
    exact = True
    # per block: runs of pages (block-relative) that may hold data, the rest are known zero
    data: dict[int, np.ndarray] = {}
    # mapped-ram, per block: runs of pages its bitmap marks though they are all zero
    forced: dict[int, np.ndarray] = {}
    if parsed.fmt == "mapped-ram":
        exact = _fill_mapped(path, buf, stream_map, parsed, data, forced)
    else:
        _stream_data(parsed, data)
    external = _fill_external(parsed, options, data, forced)
    ops = _mapped_ops(parsed, buf, forced) if parsed.fmt == "mapped-ram" else _stream_ops(parsed, buf)
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
    in_image = [data[i] + parsed.blocks[i].first_page for i in sorted(data)]
    runs = np.concatenate(in_image) if in_image else np.zeros((0, 2), np.int64)
    zero = uncovered(runs, 0, image.size // PAGE_SIZE) * PAGE_SIZE
    holes = np.stack([zero[:, 0], zero[:, 1] - zero[:, 0]], axis=1).astype(np.int64).reshape(-1, 2)
    pages, mapping = image.finish()
    closers = [] if mapping is None else [mapping]
    return Snapshot(pages, holes, Envelope(meta, ops), layout, exact, mapping, closers)


def _stream_data(parsed: ParsedStream, data: dict[int, np.ndarray]) -> None:
    """The pages whose last record is a PAGE record or a filled ZERO record, per block."""
    t = parsed.table
    keep = t.final & ((t.kind == KIND_PAGE) | (t.fill != 0))
    first_pages = np.array([b.first_page for b in parsed.blocks], np.int64)
    pages = np.sort(first_pages[t.block[keep]] + t.page[keep])
    bounds = np.searchsorted(pages, np.append(first_pages, np.iinfo(np.int64).max)).tolist()
    for index, block in enumerate(parsed.blocks):
        if bounds[index + 1] > bounds[index]:
            data[index] = runs_of(pages[bounds[index] : bounds[index + 1]] - block.first_page)


def _fill_mapped(
    path: Path,
    buf: np.ndarray,
    stream_map: Any,
    parsed: ParsedStream,
    data: dict[int, np.ndarray],
    forced: dict[int, np.ndarray],
) -> bool:
    """Copy the pages a mapped-ram file marks as written; tell whether the file is canonical
    (nothing outside the bitmap, the bitmap padding and the gaps all zero).

    Only what the file holds is read: marked pages in holes of the file are zero without reading
    them, and unmarked pages are checked for stale data only where the file has data.
    """
    exact = True
    for index, block in enumerate(parsed.blocks):
        assert block.mapped is not None
        nbytes = (block.pages + 63) // 64 * 8
        at = block.mapped.bitmap_offset
        marked, padding_clear = bitmap_runs(buf[at : at + nbytes], block.pages)
        exact &= padding_clear
        exact &= not buf[at + nbytes : block.mapped.pages_offset].any()
        release_pages(stream_map, at, block.mapped.pages_offset)
        data[index] = marked
        pages_at = block.mapped.pages_offset
        stored = _page_extents(data_extents(path, pages_at, pages_at + block.length) - [pages_at, 0])
        zero = [subtract(marked, stored)]
        for start, stop in intersect(marked, stored).tolist():
            for first in range(start, stop, CHUNK_PAGES):
                last = min(first + CHUNK_PAGES, stop)
                at = pages_at + first * PAGE_SIZE
                pages = buf[at : pages_at + last * PAGE_SIZE].reshape(-1, PAGE_SIZE)
                nonzero = parsed.image.write_pages(block.first_page + first, pages)
                if not nonzero.all():
                    zero.append(runs_of(first + np.flatnonzero(~nonzero)))
                release_pages(stream_map, at, pages_at + last * PAGE_SIZE)
        forced[index] = merge(np.concatenate(zero))
        # data QEMU left in pages it did not mark (it never does after a single save) is lost
        for start, stop in subtract(stored, marked).tolist():
            for first in range(start, stop, CHUNK_PAGES):
                lo, hi = pages_at + first * PAGE_SIZE, pages_at + min(first + CHUNK_PAGES, stop) * PAGE_SIZE
                exact &= not buf[lo:hi].any()
                release_pages(stream_map, lo, hi)
    return bool(exact)


def _page_extents(extents: np.ndarray) -> np.ndarray:
    """The runs of pages that byte extents ``(start, length)`` touch."""
    return merge(np.stack([extents[:, 0] // PAGE_SIZE, -(-(extents[:, 0] + extents[:, 1]) // PAGE_SIZE)], axis=1))


def _fill_external(
    parsed: ParsedStream, options: Mapping[str, Any], data: dict[int, np.ndarray], forced: dict[int, np.ndarray]
) -> list[str]:
    """x-ignore-shared: the blocks the stream holds no page of come from the user's RAM file."""
    if not parsed.ignore_shared:
        if options.get("ram"):
            raise ConfigError("a RAM file was given (--memory-ram), but the stream was not saved with x-ignore-shared")
        return []
    sent = np.bincount(parsed.table.block, minlength=len(parsed.blocks))
    empty = [i for i in range(len(parsed.blocks)) if not sent[i]]
    if not empty:
        return []
    names = [parsed.blocks[i].name for i in empty]
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
    _copy_raw(Path(ram), empty[0], parsed, data, forced)
    return names


def _copy_raw(
    path: Path, index: int, parsed: ParsedStream, data: dict[int, np.ndarray], forced: dict[int, np.ndarray]
) -> None:
    """The RAM file becomes the block's range of the image (mapped there, or copied in)."""
    block = parsed.blocks[index]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot read the RAM file {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size != block.length:
            raise ConfigError(f"RAM file {path} is {size} bytes, but block {block.name!r} is {block.length}")
        extents = data_extents(path)
        parsed.image.map_file(fd, block.offset, block.length, extents)
        stored = _page_extents(extents)
        if parsed.fmt == "mapped-ram" and index in data:
            # the pages its bitmap marks are now the RAM file's: which of them are all zero
            forced[index] = _zero_pages(fd, data[index], stored)
    finally:
        os.close(fd)
    data[index] = stored


def _zero_pages(fd: int, marked: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """The runs of ``marked`` that are all zero in file ``fd`` (whose data runs are ``stored``),
    read a chunk at a time."""
    zero = [subtract(marked, stored)]
    for start, stop in intersect(marked, stored).tolist():
        for first in range(start, stop, CHUNK_PAGES):
            count = min(CHUNK_PAGES, stop - first)
            chunk = np.frombuffer(os.pread(fd, count * PAGE_SIZE, first * PAGE_SIZE), np.uint8)
            pages = chunk[: chunk.shape[0] // PAGE_SIZE * PAGE_SIZE].reshape(-1, PAGE_SIZE)
            zero.append(runs_of(first + np.flatnonzero(~page_nonzero(pages))))
    return merge(np.concatenate(zero))


def _stream_ops(parsed: ParsedStream, buf: np.ndarray) -> list[Op]:
    """Runs for every record the image stands for, the bytes in between verbatim."""
    t = parsed.table
    n = len(t)
    specials: list[tuple[int, int, Op]] = []
    if n:
        fits = t.final & ((t.kind == KIND_PAGE) | (t.fill == 0))
        cont = np.zeros(n, bool)
        cont[1:] = (
            fits[1:]
            & fits[:-1]
            & ~t.named[1:]
            & (t.block[1:] == t.block[:-1])
            & (t.page[1:] == t.page[:-1] + 1)
            & (t.pos[1:] == t.end[:-1])
        )
        forced = (t.kind == KIND_PAGE) & ~t.data
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


def _mapped_ops(parsed: ParsedStream, buf: np.ndarray, forced: dict[int, np.ndarray]) -> list[Op]:
    specials: list[tuple[int, int, Op]] = []
    for index, block in enumerate(parsed.blocks):
        assert block.mapped is not None
        bits = pack_runs(forced.get(index), block.pages)
        specials.append((block.mapped.bitmap_offset, block.mapped.pages_offset + block.length, Mapped(index, bits)))
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
