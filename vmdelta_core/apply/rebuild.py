"""Rebuilding an image: the base copied, every item of the overlay applied, the result verified.

The image is rebuilt in a scratch file: first the base's image (sparse where the base is zero,
copied by the kernel where the base is a file), then each frame's items in address order. Items
are untrusted: each frame is checked (type, unit grid, order, the range the index gives it) and
each reference held inside what it refers to before a byte is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vmdelta_core.apply.bases import Decoders
from vmdelta_core.apply.feed import FileFeed, StreamFeed
from vmdelta_core.components import Encoder, SourceImage
from vmdelta_core.errors import FormatError, IntegrityError, PluginError
from vmdelta_core.fileio import copy_range, data_extents, punch_hole, punch_zero_runs
from vmdelta_core.overlay.container import FrameEntry, frame_items
from vmdelta_core.overlay.digest import digest_kind, file_digest
from vmdelta_core.overlay.items import ItemColumns, split_address
from vmdelta_core.overlay.metadata import ImageRecord, OverlayMetadata
from vmdelta_core.overlay.schema import BASE_REFS, ITEM_TYPES, Ref
from vmdelta_core.records import Progress

__all__ = ["ImageRebuilder", "copy_base", "verify_rebuilt"]

_DECODE_BATCH = 256
_KIND_OF_BASE_REF = {int(ref): kind for kind, ref in BASE_REFS.items()}


def copy_base(base: SourceImage, fd: int, size: int, unit: int, advance: Callable[[int], None]) -> None:
    """Start the rebuilt image as the base's image, sparse where the base is zero: as long as the
    base at most (the items extend it; its claimed size is set once it is found plausible)."""
    limit = min(size, base.size)
    os.ftruncate(fd, limit)
    if base.file is not None:
        # the base image is a file: let the kernel copy its data extents (a reflink where it can)
        with open(base.file, "rb") as src:
            for start, length in data_extents(base.file, 0, limit).tolist():
                copy_range(src.fileno(), fd, start, min(length, limit - start))
                advance(length)
        return
    step = 16 << 20
    holes = base.holes.tolist()
    h = 0
    pos = 0
    while pos < limit:
        end = min(pos + step, limit)
        while h < len(holes) and holes[h][0] + holes[h][1] <= pos:
            h += 1
        if not (h < len(holes) and holes[h][0] <= pos and holes[h][0] + holes[h][1] >= end):
            punch_zero_runs(fd, pos, base.data[pos:end], unit)
            base.release(pos, end)
        advance(end - pos)
        pos = end


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
        for frame, stored in self.feed.frames(number):
            where = f"frame at byte {frame.file_offset}"
            codec = self.decoders.codecs.get(frame.codec)
            if codec is None:
                raise FormatError(f"{where} names codec {frame.codec}, which the metadata does not list")
            cols = frame_items(frame, stored, codec, f"{self.feed.name}: {where}")
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

    def _write(self, number: int, cols: ItemColumns, where: str) -> None:
        fd = self.fds[number]
        offsets = cols.offsets.astype(np.int64)
        lengths = cols.lengths
        # self references last: their targets may be items of this very frame
        for ref in sorted(np.unique(cols.refs).tolist(), key=lambda r: r == Ref.SELF):
            rows = np.flatnonzero(cols.refs == ref)
            if ref == Ref.ZEROS:
                for o, n in zip(offsets[rows].tolist(), lengths[rows].tolist(), strict=True):
                    punch_hole(fd, o, n)
            elif ref in _KIND_OF_BASE_REF:
                bases = self._bases_by_kind[_KIND_OF_BASE_REF[ref]]
                for row in rows.tolist():
                    ordinal, at = split_address(int(cols.values[row]))
                    n = int(lengths[row])
                    if ordinal >= len(bases) or at + n > bases[ordinal].size:
                        raise FormatError(f"{where}: a base reference points outside the base")
                    os.pwrite(fd, bases[ordinal].data[at : at + n], int(offsets[row]))
            elif ref == Ref.SELF:
                for row in rows.tolist():
                    target, at = split_address(int(cols.values[row]))
                    n = int(lengths[row])
                    if (target, at) >= (number, int(offsets[row])) or at + n > self.meta.images[target].size:
                        raise FormatError(f"{where}: a self reference does not point to an earlier unit")
                    os.pwrite(fd, os.pread(self.fds[target], n, at), int(offsets[row]))
            elif ref == Ref.SELF_HASH:
                raise FormatError(f"{where}: SELF_HASH items are not used by overlay v1")
            else:
                encoder = self.decoders.encoders.get(ref)
                if encoder is None:
                    raise FormatError(f"{where}: items use ref {ref:#x}, which the metadata does not list")
                self._decode(encoder, rows, cols, self.bases[number], fd, where)

    def _decode(
        self, encoder: Encoder, rows: np.ndarray, cols: ItemColumns, base: SourceImage, fd: int, where: str
    ) -> None:
        offsets = cols.offsets.astype(np.int64)
        lengths = cols.lengths
        chunks = [rows[i : i + _DECODE_BATCH] for i in range(0, rows.size, _DECODE_BATCH)]

        def decode(chunk: np.ndarray) -> list[bytes]:
            at = chunk.tolist()
            bases = [memoryview(base.padded(int(offsets[r]), int(lengths[r]))) for r in at]
            payloads = [memoryview(cols.payloads[r]) for r in at]  # type: ignore[arg-type]
            return encoder.decode(bases, payloads, [int(lengths[r]) for r in at])

        try:
            decoded = list(self.pool.map(decode, chunks))
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        for chunk, units in zip(chunks, decoded, strict=True):
            if len(units) != chunk.size:
                raise PluginError(f"encoder {encoder.name!r} decoded {len(units)} units of {chunk.size}")
            for r, data in zip(chunk.tolist(), units, strict=True):
                if len(data) != lengths[r]:
                    raise FormatError(
                        f"{where}: a {encoder.name} payload decodes to {len(data)} bytes, not {lengths[r]}"
                    )
                os.pwrite(fd, data, int(offsets[r]))


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
    digest = file_digest(path, digest_kind(image.digest))
    if digest != image.digest:
        raise IntegrityError(f"rebuilt {image.name} does not match the digest recorded at create time")
    return digest
