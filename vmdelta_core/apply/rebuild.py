"""Rebuilding an image: the base copied, every item of the overlay applied, the result verified.

The image is rebuilt in a scratch file: first the base's image (sparse where the base is zero,
copied by the kernel where the base is a file), then each frame's items in address order. Items
are untrusted: each frame is checked (type, unit grid, order, the range the index gives it) and
each reference held inside what it refers to before a byte is written.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from vmdelta_core.apply.bases import Decoders
from vmdelta_core.apply.feed import FileFeed, StreamFeed
from vmdelta_core.components import Encoder, SourceImage
from vmdelta_core.errors import FormatError, IntegrityError, PluginError
from vmdelta_core.fileio import copy_range, data_extents, punch_hole, punch_zero_runs, write_pieces
from vmdelta_core.overlay.container import FrameEntry, frame_items
from vmdelta_core.overlay.digest import digest_kind, own_file_digest
from vmdelta_core.overlay.items import ADDRESS_BITS, OFFSET_MASK, ItemColumns
from vmdelta_core.overlay.metadata import ImageRecord, OverlayMetadata
from vmdelta_core.overlay.schema import BASE_REFS, ITEM_TYPES, Ref
from vmdelta_core.records import Progress

__all__ = ["ImageRebuilder", "copy_base", "verify_rebuilt"]

_DECODE_BATCH = 256
_KIND_OF_BASE_REF = {int(ref): kind for kind, ref in BASE_REFS.items()}


#: the most a piece of a base copy covers: pieces are copied in parallel and stopped between
_PIECE = 16 << 20


def copy_base(
    base: SourceImage,
    fd: int,
    size: int,
    unit: int,
    advance: Callable[[int], None],
    *,
    pool: ThreadPoolExecutor | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Start the rebuilt image as the base's image, sparse where the base is zero: as long as the
    base at most (the items extend it; its claimed size is set once it is found plausible).

    The base's data is copied in pieces of at most 16 MiB: by the kernel where the base image is
    a file (a reflink where it can), else written from its map with whole zero units left as
    holes. With ``pool`` the pieces are copied in parallel (both release the GIL); ``stop``, when
    set, ends the copy between two pieces.
    """
    limit = min(size, base.size)
    os.ftruncate(fd, limit)
    if base.file is not None:
        src = os.open(base.file, os.O_RDONLY | os.O_CLOEXEC)
        pieces = _pieces(data_extents(base.file, 0, limit), limit)

        def copy(start: int, length: int) -> int:
            copy_range(src, fd, start, length)
            return length

    else:
        src = -1
        pieces = _pieces(_complement(base.holes, limit), limit)

        def copy(start: int, length: int) -> int:
            punch_zero_runs(fd, start, base.data[start : start + length], unit)
            base.release(start, start + length)
            return length

    try:
        advance(limit - sum(length for _, length in pieces))  # the holes: nothing to copy
        if pool is None:
            for start, length in pieces:
                if stop is not None and stop.is_set():
                    return
                advance(copy(start, length))
            return
        futures = [pool.submit(copy, start, length) for start, length in pieces]
        try:
            for future in futures:
                advance(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)  # none still writes once the error is raised
            raise
    finally:
        if src >= 0:
            os.close(src)


def _complement(holes: np.ndarray, limit: int) -> np.ndarray:
    """The ``(start, length)`` ranges of ``[0, limit)`` that no hole covers."""
    out, pos = [], 0
    for start, length in holes.tolist():
        if start > pos:
            out.append((pos, min(start, limit) - pos))
        pos = max(pos, start + length)
        if pos >= limit:
            break
    if pos < limit:
        out.append((pos, limit - pos))
    return np.array([r for r in out if r[1] > 0], dtype=np.int64).reshape(-1, 2)


def _pieces(ranges: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """``ranges`` (start, length) within ``[0, limit)``, cut into pieces of at most ``_PIECE``."""
    out = []
    for start, length in ranges.tolist():
        end = min(start + length, limit)
        out += [(at, min(at + _PIECE, end) - at) for at in range(start, end, _PIECE)]
    return out


class ImageRebuilder:
    """Applies the items of an overlay's images to their scratch files, image by image.

    :param scratch_fds: the scratch file of every image, in overlay order (self references may
        read any earlier image).
    """

    def __init__(
        self,
        feed: FileFeed | StreamFeed,
        meta: OverlayMetadata,
        decoders: Decoders,
        bases: Sequence[SourceImage],
        scratch_fds: Sequence[int],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.feed = feed
        self.meta = meta
        self.decoders = decoders
        self.bases = bases
        self.fds = scratch_fds
        self.pool = pool
        self._bases_by_kind: dict[str, list[SourceImage]] = {"memory": [], "disk": []}
        for base, image in zip(bases, meta.images, strict=True):
            self._bases_by_kind[image.kind].append(base)

    def apply_items(
        self, number: int, progress: Progress, *, on_final: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Write every item of image ``number``; the sorted indices of the units written.

        :param on_final: told, after each frame, the offset below which the image is final (its
            items come in address order, and what no item names is the base's, already there).
        """
        image = self.meta.images[number]
        advance = progress.start(f"rebuild {image.name}", image.size)
        written: list[np.ndarray] = []
        previous, done = -1, 0
        for frame, items in self._parsed_ahead(number):
            where = f"frame at byte {frame.file_offset}"
            cols = items.result()
            previous = _check_frame(cols, frame, image, self.meta.unit_size, previous)
            self._write(number, cols, where)
            written.append(cols.offsets.astype(np.int64) // self.meta.unit_size)
            advance(frame.end_offset - done)
            done = frame.end_offset
            if on_final is not None:
                on_final(done)
        for base in self.bases:  # base and self references read anywhere: drop those pages
            base.release(0, base.size)
        return np.sort(np.concatenate(written)) if written else np.zeros(0, dtype=np.int64)

    def _parsed_ahead(self, number: int) -> Iterator[tuple[FrameEntry, Future[ItemColumns]]]:
        """Image ``number``'s frames, each decompressed and parsed on the pool while the frame
        before it is written (two frames held at most)."""

        def parse(frame: FrameEntry, stored: bytes) -> ItemColumns:
            where = f"frame at byte {frame.file_offset}"
            codec = self.decoders.codecs.get(frame.codec)
            if codec is None:
                raise FormatError(f"{where} names codec {frame.codec}, which the metadata does not list")
            return frame_items(frame, stored, codec, f"{self.feed.name}: {where}", self._read_base)

        ahead: tuple[FrameEntry, Future[ItemColumns]] | None = None
        for frame, stored in self.feed.frames(number):
            parsing = (frame, self.pool.submit(parse, frame, stored))
            if ahead is not None:
                yield ahead
            ahead = parsing
        if ahead is not None:
            yield ahead

    def _read_base(self, number: int, offset: int, length: int) -> bytes:
        """Bytes of image ``number``'s base, for frames compressed against it (``zstd-base``)."""
        base = self.bases[number]
        if offset + length > base.size:
            raise FormatError(f"a frame of image {number} reads its base past its end ({offset} + {length})")
        return base.data[offset : offset + length].tobytes()

    def _write(self, number: int, cols: ItemColumns, where: str) -> None:
        """Write a frame's items, runs of adjacent units with one system call each.

        Self references go last (their targets may be items of this very frame). Where a unit
        appears twice (a live item repeating the one before), the later ref in that order wins,
        then the later item.
        """
        self._check_refs(number, cols, where)
        is_self = cols.refs == Ref.SELF
        offsets = cols.offsets.astype(np.int64)
        for rows in _windows(np.flatnonzero(~is_self), offsets):
            self._write_rows(number, cols, rows, where)
        self_rows = np.flatnonzero(is_self)
        if self_rows.size:
            self._copy_self(number, cols, self_rows, offsets)

    def _check_refs(self, number: int, cols: ItemColumns, where: str) -> None:
        """Refuse, before a byte of the frame is written, a ref this overlay does not list and a
        base or self reference that points outside what it refers to."""
        refs = cols.refs
        known = {int(Ref.ZEROS), int(Ref.SELF), *_KIND_OF_BASE_REF, *self.decoders.encoders}
        for ref in np.unique(refs).tolist():
            if ref == Ref.SELF_HASH:
                raise FormatError(f"{where}: SELF_HASH items are not used by overlay v1")
            if ref not in known:
                raise FormatError(f"{where}: items use ref {ref:#x}, which the metadata does not list")
        lengths = cols.lengths.astype(np.int64)
        for ref, kind in _KIND_OF_BASE_REF.items():
            rows = np.flatnonzero(refs == ref)
            if not rows.size:
                continue
            ordinal, at = _split(cols.values[rows])
            sizes = np.array([base.size for base in self._bases_by_kind[kind]], dtype=np.int64)
            inside = ordinal < sizes.size
            if not inside.all() or (at + lengths[rows] > sizes[ordinal]).any():
                raise FormatError(f"{where}: a base reference points outside the base")
        rows = np.flatnonzero(refs == Ref.SELF)
        if rows.size:
            target, at = _split(cols.values[rows])
            offsets = cols.offsets[rows].astype(np.int64)
            earlier = (target < number) | ((target == number) & (at < offsets))
            if not earlier.all():
                raise FormatError(f"{where}: a self reference does not point to an earlier unit")
            sizes = np.array([image.size for image in self.meta.images], dtype=np.int64)
            if (at + lengths[rows] > sizes[target]).any():
                raise FormatError(f"{where}: a self reference does not point to an earlier unit")

    def _write_rows(self, number: int, cols: ItemColumns, rows: np.ndarray, where: str) -> None:
        """Zeros, base references and encoded units of ``rows``: every unit's bytes found (the
        encoded ones decoded on the pool), then written run by run."""
        offsets = cols.offsets[rows].astype(np.int64)
        refs = cols.refs[rows]
        encoded = rows[~np.isin(refs, [int(Ref.ZEROS), *_KIND_OF_BASE_REF])]  # all decoded: all checked
        if (np.diff(offsets) == 0).any():  # a repeated unit: keep the last in ref, then item order
            order = np.lexsort((rows, refs, offsets))
            keep = order[np.append(offsets[order][1:] != offsets[order][:-1], True)]
            rows, offsets, refs = rows[keep], offsets[keep], refs[keep]
        lengths = cols.lengths[rows].astype(np.int64)
        pieces: list[object] = [None] * rows.size
        for ref, kind in _KIND_OF_BASE_REF.items():
            at_rows = np.flatnonzero(refs == ref)
            if at_rows.size:
                bases = self._bases_by_kind[kind]
                ordinal, at = _split(cols.values[rows[at_rows]])
                for k, o, a, n in zip(
                    at_rows.tolist(), ordinal.tolist(), at.tolist(), lengths[at_rows].tolist(), strict=True
                ):
                    pieces[k] = bases[o].data[a : a + n]
        if encoded.size:
            decoded = self._decode_rows(cols, encoded, self.bases[number], where)
            position = dict(zip(rows.tolist(), range(rows.size), strict=True))
            for row, data in zip(encoded.tolist(), decoded, strict=True):
                k = position.get(row)
                if k is not None:
                    pieces[k] = data
        _write_runs(self.fds[number], offsets, lengths, refs == Ref.ZEROS, pieces)

    def _copy_self(self, number: int, cols: ItemColumns, rows: np.ndarray, offsets: np.ndarray) -> None:
        """Self references: each run of units whose sources are adjacent too read with one
        ``pread`` and the units written run by run. Sources that are targets of this frame's
        self references are copied one at a time, in item order, as each must see the last."""
        offsets = offsets[rows]
        lengths = cols.lengths[rows].astype(np.int64)
        target, at = _split(cols.values[rows])
        fd = self.fds[number]
        mine = target == number
        starts = np.searchsorted(offsets + lengths, at[mine], side="right")
        chained = (starts < offsets.size) & (offsets[np.minimum(starts, offsets.size - 1)] < at[mine] + lengths[mine])
        if chained.any():
            for t, a, o, n in zip(target.tolist(), at.tolist(), offsets.tolist(), lengths.tolist(), strict=True):
                os.pwrite(fd, os.pread(self.fds[t], n, a).ljust(n, b"\0"), o)
            return
        last = np.append(offsets[1:] != offsets[:-1], True)  # a repeated unit: the later item wins
        offsets, lengths, target, at = offsets[last], lengths[last], target[last], at[last]
        # runs whose sources are adjacent in one image: one read each
        joined = (target[1:] == target[:-1]) & (at[1:] == at[:-1] + lengths[:-1])
        joined &= offsets[1:] == offsets[:-1] + lengths[:-1]
        edges = np.flatnonzero(np.concatenate(([True], ~joined)))
        ends = np.append(edges[1:], offsets.size)
        pieces = []
        for s, e in zip(edges.tolist(), ends.tolist(), strict=True):
            n = int(offsets[e - 1] + lengths[e - 1] - offsets[s])
            data = os.pread(self.fds[int(target[s])], n, int(at[s]))
            pieces.append(data.ljust(n, b"\0"))  # read past a grown image's end: zeros
        run_offsets = offsets[edges]
        run_lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        _write_runs(fd, run_offsets, run_lengths, np.zeros(edges.size, dtype=bool), pieces)

    def _decode_rows(self, cols: ItemColumns, rows: np.ndarray, base: SourceImage, where: str) -> list[bytes]:
        """The units of encoded ``rows`` (any mix of encoders), decoded on the pool in batches."""
        offsets = cols.offsets.astype(np.int64)
        lengths = cols.lengths
        refs = cols.refs[rows]
        batches: list[tuple[Encoder, np.ndarray]] = []
        for ref in np.unique(refs).tolist():
            mine = rows[refs == ref]
            encoder = self.decoders.encoders[ref]
            batches += [(encoder, mine[i : i + _DECODE_BATCH]) for i in range(0, mine.size, _DECODE_BATCH)]

        def decode(batch: tuple[Encoder, np.ndarray]) -> list[bytes]:
            encoder, chunk = batch
            at = chunk.tolist()
            bases = [_base_unit(base, int(offsets[r]), int(lengths[r])) for r in at]
            payloads = [memoryview(cols.payloads[r]) for r in at]  # type: ignore[arg-type]
            units = encoder.decode(bases, payloads, [int(lengths[r]) for r in at])
            if len(units) != chunk.size:
                raise PluginError(f"encoder {encoder.name!r} decoded {len(units)} units of {chunk.size}")
            for r, data in zip(at, units, strict=True):
                if len(data) != lengths[r]:
                    raise FormatError(f"a {encoder.name} payload decodes to {len(data)} bytes, not {lengths[r]}")
            return units

        try:
            decoded = list(self.pool.map(decode, batches))
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        by_row = {}
        for (_, chunk), units in zip(batches, decoded, strict=True):
            by_row.update(zip(chunk.tolist(), units, strict=True))
        return [by_row[r] for r in rows.tolist()]


def _base_unit(base: SourceImage, start: int, length: int) -> memoryview:
    """The base's bytes of a unit: a view of its map, copied and zero-padded only past its end."""
    if start + length <= base.size:
        return memoryview(base.data[start : start + length])
    return memoryview(base.padded(start, length))


#: items handled at once: bounds the decoded bytes held (a few MiB) whatever a frame holds
_WINDOW = 2048


def _windows(rows: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """``rows`` cut into pieces of about ``_WINDOW`` items, never between two items of one unit."""
    if rows.size <= _WINDOW:
        return [rows] if rows.size else []
    at = offsets[rows]
    cuts = [k for k in range(_WINDOW, rows.size, _WINDOW)]
    cuts = [int(np.searchsorted(at, at[k], side="left")) for k in cuts]
    return [part for part in np.split(rows, sorted(set(cuts))) if part.size]


def _split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_address` of a column: (ordinal or image number, byte offset), as int64."""
    values = values.astype(np.uint64)
    return (values >> np.uint64(ADDRESS_BITS)).astype(np.int64), (values & np.uint64(OFFSET_MASK)).astype(np.int64)


def _write_runs(fd: int, offsets: np.ndarray, lengths: np.ndarray, zero: np.ndarray, pieces: list[object]) -> None:
    """Write units sorted by offset: each run of adjacent units with data in one ``pwritev``,
    each run of zero units punched as one hole."""
    if not offsets.size:
        return
    adjacent = (offsets[1:] == offsets[:-1] + lengths[:-1]) & (zero[1:] == zero[:-1])
    edges = np.flatnonzero(np.concatenate(([True], ~adjacent)))
    ends = np.append(edges[1:], offsets.size)
    for s, e in zip(edges.tolist(), ends.tolist(), strict=True):
        start = int(offsets[s])
        if zero[s]:
            punch_hole(fd, start, int(offsets[e - 1] + lengths[e - 1]) - start)
        else:
            write_pieces(fd, start, pieces[s:e])


def _check_frame(cols: ItemColumns, frame: FrameEntry, image: ImageRecord, unit: int, previous: int) -> int:
    """Refuse items that are not where and what the frame says; the last item's offset."""
    if not len(cols):
        return previous
    where = f"frame at byte {frame.file_offset}"
    offsets = cols.offsets.astype(np.int64)
    lengths = cols.lengths
    size = image.size
    if not set(np.unique(cols.types).tolist()) <= {int(t) for t in ITEM_TYPES[image.kind]}:
        raise FormatError(f"{where}: items of the wrong image type for {image.name}")
    if (offsets % unit).any() or (offsets < 0).any() or (offsets >= size).any():
        raise FormatError(f"{where}: an item lies outside {image.name} or off the unit grid")
    if (lengths != np.minimum(unit, size - offsets)).any():
        raise FormatError(f"{where}: an item's length does not match its unit")
    if offsets[0] < frame.first_offset or int(offsets[-1]) + int(lengths[-1]) > frame.end_offset:
        raise FormatError(f"{where}: items lie outside the range the index gives the frame")
    # address order: strictly increasing, except a live item may repeat the unit before it
    steps = np.diff(np.concatenate(([previous], offsets)))
    if ((steps < 0) | ((steps == 0) & (cols.live_seqs < 0))).any():
        raise FormatError(f"{where}: items are not in address order")
    return int(offsets[-1])


def verify_rebuilt(image: ImageRecord, path: Path, output_format: str | None, progress: Progress) -> str:
    """The rebuilt image's digest, checked against the one recorded at create time.

    When the source reproduces the artifact byte for byte (an ``artifact_digest`` is recorded and
    no other output format is asked for), the artifact's own digest, checked after materialize,
    covers the image and this pass is skipped.
    """
    if image.artifact_digest and not output_format:
        return image.digest
    progress.start(f"verify {image.name}", image.size)
    digest = own_file_digest(path, digest_kind(image.digest))
    if digest != image.digest:
        raise IntegrityError(f"rebuilt {image.name} does not match the digest recorded at create time")
    return digest
