"""The fast path over RAM records: one ZERO or PAGE record per page, millions per stream.

A stopped VM's stream sends the pages of a block in order, so records come in long stretches of
the same kind at a fixed stride (8 + 4096 bytes for PAGE, 8 + 1 for ZERO). The scanner checks
whole stretches at once with a strided numpy view of their headers and copies their pages into
the image with one strided copy each; only records that break a stretch (a block name, a change
of kind) go through ``struct``. Nothing is created per page except array elements. A stretch is
taken at most :data:`~vmdelta_source_qemu.imagefile.CHUNK_PAGES` records at a time, and the
stream's pages are released once their records are in the image, so the scan holds a bounded
part of the stream. Nothing is kept per page of the image either, only per record: which record
wrote a page last is found once the scan is done, so memory follows the records a stream holds,
not the RAM its block table claims.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from vmdelta_core.plugin import FormatError, release_pages
from vmdelta_source_qemu.blocks import RamBlock
from vmdelta_source_qemu.c_migration import PAGE_SIZE, RamFlag
from vmdelta_source_qemu.imagefile import CHUNK_PAGES, ImageFile

__all__ = ["KIND_PAGE", "KIND_ZERO", "REFUSED_FLAGS", "RecordScanner", "RecordTable"]

KIND_ZERO = 1
KIND_PAGE = 2

_BE64 = struct.Struct(">Q")
_PAGE_CONT = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO_CONT = int(RamFlag.ZERO | RamFlag.CONTINUE)
_CONTINUE = int(RamFlag.CONTINUE)
_EOS = int(RamFlag.EOS)
_FLUSH = int(RamFlag.MULTIFD_FLUSH)
_KINDS = {int(RamFlag.PAGE): KIND_PAGE, int(RamFlag.ZERO): KIND_ZERO}
_STRIDE = {KIND_PAGE: 8 + PAGE_SIZE, KIND_ZERO: 8 + 1}
#: stream bytes parsed before they are released from the map, in one call
_RELEASE_STEP = 16 << 20
REFUSED_FLAGS = (
    (RamFlag.XBZRLE, "an XBZRLE-compressed page (RAM_SAVE_FLAG_XBZRLE): turn off the xbzrle capability"),
    (RamFlag.COMPRESS_PAGE, "a compressed page (RAM_SAVE_FLAG_COMPRESS_PAGE): turn off the compress capability"),
    (RamFlag.HOOK, "an RDMA hook record (RAM_SAVE_FLAG_HOOK): migrate over a file or socket URI, not rdma:"),
)


class RecordTable:
    """Columns of every ZERO/PAGE record in stream order (numpy arrays, one element a record).

    ``data`` tells whether the page holds a non-zero byte once the record is applied (PAGE: its
    data, ZERO: its fill byte); ``final`` (set by :meth:`RecordScanner.finish`) whether no later
    record writes the same page.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, ...]] = []
        self.pos = self.end = self.page = np.zeros(0, np.int64)
        self.block = np.zeros(0, np.int32)
        self.kind = self.fill = np.zeros(0, np.uint8)
        self.named = self.data = self.final = np.zeros(0, bool)

    def add(
        self,
        pos: np.ndarray,
        end: np.ndarray,
        block: int,
        page: np.ndarray,
        kind: int,
        fill: np.ndarray,
        named: bool,
        data: np.ndarray,
    ) -> None:
        n = pos.shape[0]
        flag = np.zeros(n, bool)
        flag[0] = named
        self._chunks.append((pos, end, np.full(n, block, np.int32), page, np.full(n, kind, np.uint8), fill, flag, data))

    def freeze(self) -> None:
        if self._chunks:
            cols = [np.concatenate(c) for c in zip(*self._chunks, strict=True)]
            self.pos, self.end, self.block, self.page, self.kind, self.fill, self.named, self.data = cols
            self.fill = self.fill.astype(np.uint8)
        self._chunks = []
        self.final = np.ones(len(self), bool)

    def __len__(self) -> int:
        return int(self.pos.shape[0])


class RecordScanner:
    """Reads the records of RAM sections into a :class:`RecordTable` and the image.

    :param buf: the whole stream as a ``uint8`` array.
    :param image: the memory image the pages go to.
    :param mapping: the read-only map ``buf`` views, if any: records are released from it once
        their pages are in the image.

    Records are applied in stream order, except that a ZERO record does not write zeros over an
    earlier record's page as it is read (the image is zero where nothing was written, and which
    pages were written is not kept per page): :meth:`finish` clears the pages whose last record
    is such a ZERO record.
    """

    def __init__(self, buf: np.ndarray, blocks: Sequence[RamBlock], image: ImageFile, mapping: Any = None) -> None:
        self.buf = buf
        self.mapping = mapping
        self.view = memoryview(buf)  # type: ignore[arg-type]
        self.blocks = list(blocks)
        self.by_name = {b.name: i for i, b in enumerate(self.blocks)}
        self.image = image
        self.table = RecordTable()
        self.rewritten = False  # some page written by more than one record
        self.flushes = 0
        self.current: int | None = None  # block of the previous record, for CONTINUE
        self.released = 0  # stream bytes before this are released from the map

    def scan(self, pos: int) -> int:
        """Read records from ``pos`` through the EOS record; returns the offset after it."""
        size = self.buf.shape[0]
        view = self.view
        while True:
            if pos + 8 > size:
                raise FormatError(f"stream truncated inside a RAM section at offset {pos}")
            (header,) = _BE64.unpack_from(view, pos)
            flags = header & 0xFFF
            offset = header - flags
            for flag, what in REFUSED_FLAGS:
                if flags & flag:
                    raise FormatError(f"offset {pos}: {what}")
            if flags == _EOS:
                return pos + 8
            if flags == _FLUSH:
                self.flushes += 1
                pos += 8
                continue
            kind = _KINDS.get(flags & ~_CONTINUE)
            if kind is None:
                raise FormatError(f"offset {pos}: RAM record with unknown flags {flags:#x}")
            start = pos
            pos += 8
            named = not flags & _CONTINUE
            if named:
                if pos >= size or pos + 1 + view[pos] > size:
                    raise FormatError(f"stream truncated inside a RAM record at offset {start}")
                length = view[pos]
                name = bytes(view[pos + 1 : pos + 1 + length]).decode("latin-1")
                pos += 1 + length
                if name not in self.by_name:
                    raise FormatError(f"offset {start}: RAM record for block {name!r}, which is not in the block table")
                self.current = self.by_name[name]
            elif self.current is None:
                raise FormatError(f"offset {start}: RAM record continues a block, but no block was named before")
            block = self.blocks[self.current]
            if offset >= block.length:
                raise FormatError(
                    f"offset {start}: RAM record at {offset:#x} lies beyond block {block.name!r} "
                    f"({block.length:#x} bytes)"
                )
            stride = _STRIDE[kind]
            count = 1
            if not named:
                count = self._stretch(start, stride, header, block)
            if start + (pos - start) + (stride - 8) + (count - 1) * stride > size:
                raise FormatError(f"stream truncated inside a RAM record at offset {start}")
            self._take(start, pos, count, stride, kind, self.current, offset // PAGE_SIZE, named)
            pos += stride - 8 + (count - 1) * stride

    def _stretch(self, start: int, stride: int, header: int, block: RamBlock) -> int:
        """How many records from ``start`` continue the same block, kind and page sequence."""
        size = self.buf.shape[0]
        page = (header & ~0xFFF) // PAGE_SIZE
        available = min((size - start) // stride, block.pages - page, CHUNK_PAGES)
        if available <= 1:
            return 1
        # cheap look at the next record before paying for numpy
        (following,) = _BE64.unpack_from(self.view, start + stride)
        if following != header + PAGE_SIZE:
            return 1
        done, batch = 0, 64
        while done < available:
            n = min(batch, available - done)
            first = start + done * stride
            heads = as_strided(self.buf[first:], shape=(n, 8), strides=(stride, 1)).copy().view(">u8").ravel()
            expect = np.arange(n, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(header + done * PAGE_SIZE)
            bad = np.flatnonzero(heads != expect)
            if bad.shape[0]:
                return done + int(bad[0])
            done += n
            batch = min(batch * 4, 1 << 16)
        return done

    def _take(
        self, start: int, data: int, count: int, stride: int, kind: int, block_index: int, page: int, named: bool
    ) -> None:
        """Record ``count`` records of one kind and apply them to the image, in stream order."""
        block = self.blocks[block_index]
        index = np.arange(count, dtype=np.int64)
        pos = start + index * stride
        if named:
            pos[0] = start
        end = data + index * stride + stride - 8
        pages = page + index
        if kind == KIND_PAGE:
            pages_in = as_strided(self.buf[data:], shape=(count, PAGE_SIZE), strides=(stride, 1))
            nonzero = self.image.write_pages(block.first_page + page, pages_in)
            fill = np.zeros(count, np.uint8)
        else:
            fill = as_strided(self.buf[data:], shape=(count,), strides=(stride,)).copy()
            nonzero = fill != 0
            # a fresh image is zero already: pages written before are cleared by finish()
            if nonzero.any():
                self.image.fill_pages(block.first_page + pages[nonzero], fill[nonzero])
        done = data + count * stride - 8
        if done - self.released >= _RELEASE_STEP:
            release_pages(self.mapping, self.released, done)
            self.released = done
        self.table.add(pos, end, block_index, pages, kind, fill, named, nonzero)

    def finish(self) -> RecordTable:
        """The table of every record read, with ``final`` set; pages whose last record is a ZERO
        record after an earlier write are cleared in the image."""
        t = self.table
        t.freeze()
        if len(t) < 2:
            return t
        first_pages = np.array([b.first_page for b in self.blocks], np.int64)
        image_pages = first_pages[t.block] + t.page
        # a stopped VM's save sends each page once, in image order: nothing to sort
        if (np.diff(image_pages) > 0).all():
            return t
        order = np.argsort(image_pages, kind="stable")
        ordered = image_pages[order]
        new = ordered[1:] != ordered[:-1]
        first = np.concatenate(([True], new))
        last = np.concatenate((new, [True]))
        t.final[:] = False
        t.final[order[last]] = True
        resent = np.zeros(len(t), bool)
        resent[order[last & ~first]] = True
        self.rewritten = bool(resent.any())
        cleared = resent & (t.kind == KIND_ZERO) & (t.fill == 0)
        if cleared.any():
            targets = np.sort(image_pages[cleared])
            self.image.fill_pages(targets, np.zeros(targets.shape[0], np.uint8))
        return t
