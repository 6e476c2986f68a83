"""Choosing what a frame is compressed against in the size mode (the ``zstd-base`` codec).

Unit dedup finds a changed unit only when the base holds it whole and aligned. Much of what is
left still lies in the base, shifted by a few bytes (a file rewritten with an insertion, a page
whose objects moved) or in pieces. ``zstd --patch-from`` finds those by indexing the whole base,
which costs it tens of seconds. Here each frame gets a prefix of its own: the base bytes at its
units' addresses, and the base ranges where its units' content is found, by a sampled index of the
base (one 32-byte window every 32 bytes) looked up at every byte of the frame's payloads. Any run
of 63 equal bytes hits the index; a range is kept once several windows of one unit agree on it.

A prefix is worth only what its frame refers to: bytes nothing refers to make every offset into
it dearer. The two kinds of image differ there (measured on realistic-128 and realistic-512, see
``bench/REPORT.md``, "Size mode"). A disk block found elsewhere in the base is a file moved or
rewritten: a disk unit takes the two ranges most of its windows agree on, and its own address
only when that still holds some of its words. A memory page takes every range found and its own
address: leaner memory prefixes came out larger.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vmdelta_core.builtin.codecs import MAX_PREFIX, MAX_PREFIX_RUNS
from vmdelta_core.components import SourceImage
from vmdelta_core.overlay.items import unpack_items
from vmdelta_core.overlay.schema import Ref

__all__ = ["BaseMatcher", "FramePrefixes"]

#: bytes of a sampled window, and the stride of the windows the base index holds
WINDOW = 32
STRIDE = 32
#: windows the index holds at most (16 bytes each, and as much again while it is sorted): a base
#: larger than 256 MiB is sampled at a wider stride, so the index stays within 256 MiB
MAX_WINDOWS = 8 << 20
#: windows of one unit that must agree on a base range before it joins the prefix
MIN_HITS = 3
#: a disk unit's prefix: the base ranges most of its windows agree on, at most this many...
DISK_RANGES = 2
#: ...and its own address only when it shares this many non-zero 8-byte words with the base there
DISK_OWN_WORDS = 8
#: a unit found in the base is located to the 4 KiB block it would start in; the prefix takes
#: that block and the next, so it holds the unit whatever its shift
_BLOCK = 4096
#: the bucket bitmap has 2**_BUCKET_BITS entries (16 MiB): a few percent of them are set
_BUCKET_BITS = 24
_M = [np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)]


def _mix(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """A 64-bit hash of four little-endian words (a 32-byte window), column by column."""
    h = (a * _M[0]) ^ (b * _M[1])
    h += (c * _M[2]) ^ (d * _M[3])
    return h ^ (h >> np.uint64(29))


class BaseMatcher:
    """The sampled index of one base image: where each non-uniform 32-byte window starts."""

    def __init__(self, base: SourceImage) -> None:
        self.base = base
        stride = STRIDE
        while base.size // stride > MAX_WINDOWS:  # a large base is sampled more sparsely
            stride *= 2
        words = np.ascontiguousarray(base.data[: base.size // 8 * 8]).view("<u8")
        step = stride // 8
        count = (words.shape[0] - 3 + step - 1) // step
        a, b, c, d = (words[k : k + step * count : step] for k in range(4))
        varied = np.flatnonzero(~((a == b) & (a == c) & (a == d)))  # runs of one word say nothing
        hashes = _mix(a[varied], b[varied], c[varied], d[varied])
        order = np.argsort(hashes, kind="stable")
        hashes, starts = hashes[order], varied[order].astype(np.int64) * stride
        first = np.ones(hashes.shape[0], dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        self.hashes, self.starts = hashes[first], starts[first]
        #: a bucket bitmap on the hashes' top bits: most windows of a frame are out at one lookup
        self.buckets = np.zeros(1 << _BUCKET_BITS, dtype=bool)
        self.buckets[self.hashes >> np.uint64(64 - _BUCKET_BITS)] = True
        base.release(0, base.size)  # read once: the prefixes fault back in only what they take

    def find(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``data``, base offset) of every window of ``data`` the index holds."""
        positions, offsets = [], []
        for shift in range(8):
            count = (len(data) - shift) // 8
            if count < 4:
                continue
            words = np.frombuffer(data, dtype="<u8", count=count, offset=shift)
            hashes = _mix(words[:-3], words[1:-2], words[2:-1], words[3:])
            maybe = np.flatnonzero(self.buckets[hashes >> np.uint64(64 - _BUCKET_BITS)])
            at = np.searchsorted(self.hashes, hashes[maybe])
            at[at >= self.hashes.shape[0]] = 0
            hit = self.hashes[at] == hashes[maybe]
            positions.append(maybe[hit].astype(np.int64) * 8 + shift)
            offsets.append(self.starts[at[hit]])
        if not positions:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(positions), np.concatenate(offsets)


class FramePrefixes:
    """The prefix chooser of ``zstd-base`` (``choose(image, frame)``): one matcher per base."""

    def __init__(self, bases: list[SourceImage], pool: ThreadPoolExecutor | None = None) -> None:
        if pool is None:
            self.matchers = [BaseMatcher(base) for base in bases]
        else:
            self.matchers = list(pool.map(BaseMatcher, bases))

    def __call__(self, image: int, frame: bytes) -> tuple[list[tuple[int, int]], bytes]:
        """The base runs frame ``frame`` of image ``image`` is compressed against, and their bytes."""
        matcher = self.matchers[image]
        size = matcher.base.size
        cols = unpack_items(frame)
        rows = [i for i in range(len(cols)) if cols.refs[i] == Ref.RAW and cols.payloads[i] is not None]
        if not rows:
            return [], b""
        payloads = [bytes(cols.payloads[i]) for i in rows]  # type: ignore[arg-type]
        lengths = np.array([len(p) for p in payloads], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        own = cols.offsets[rows].astype(np.int64)
        ends = np.minimum(own + lengths, size)
        disk = matcher.base.kind == "disk"
        if disk:
            kept = np.array(
                [
                    _shared_words(payload, matcher.base.data, lo, hi) >= DISK_OWN_WORDS
                    for payload, lo, hi in zip(payloads, own.tolist(), ends.tolist(), strict=True)
                ],
                dtype=bool,
            )
            own, ends = own[kept], ends[kept]
        ranges = [np.stack([own, ends], axis=1)]  # the units' own addresses
        positions, offsets = matcher.find(b"".join(payloads))
        if positions.size:
            row = np.searchsorted(starts, positions, side="right") - 1
            # the base unit where the unit would start: windows shifted by a few bytes agree on it
            block = (offsets - (positions - starts[row])) // _BLOCK
            keys, hits = np.unique(np.stack([row, block], axis=1), axis=0, return_counts=True)
            keys, hits = keys[hits >= MIN_HITS], hits[hits >= MIN_HITS]
            if disk:  # each unit's best ranges: by unit, most hits first
                order = np.lexsort((-hits, keys[:, 0]))
                keys = keys[order]
                rank = np.arange(keys.shape[0]) - np.searchsorted(keys[:, 0], keys[:, 0])
                keys = keys[rank < DISK_RANGES]
            agreed = keys[:, 1]
            lo = np.maximum(agreed * _BLOCK, 0)
            hi = np.minimum(agreed * _BLOCK + 2 * _BLOCK, size)
            ranges.append(np.stack([lo, hi], axis=1))
        runs = _merged(np.concatenate(ranges))
        data = matcher.base.data
        return runs, b"".join(data[lo : lo + n].tobytes() for lo, n in runs)


def _shared_words(payload: bytes, data: np.ndarray, lo: int, hi: int) -> int:
    """How many non-zero 8-byte words ``payload`` shares with ``data[lo:hi]``, word for word."""
    count = min(len(payload), hi - lo) // 8
    if count <= 0:
        return 0
    new = np.frombuffer(payload, dtype="<u8", count=count)
    old = np.frombuffer(data[lo : lo + count * 8], dtype="<u8")
    return int(np.count_nonzero((new == old) & (new != 0)))


def _merged(ranges: np.ndarray) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges sorted and merged where they touch, as (offset, length) runs, cut to
    the bounds a reader holds a frame to (a frame of at most 64 MiB rarely comes near them)."""
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    runs: list[list[int]] = []
    for lo, hi in ranges.tolist():
        if runs and lo <= runs[-1][0] + runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], hi - runs[-1][0])
        else:
            runs.append([lo, hi - lo])
    out, total = [], 0
    for lo, n in runs[:MAX_PREFIX_RUNS]:
        if total + n > MAX_PREFIX:
            break
        out.append((lo, n))
        total += n
    return out
