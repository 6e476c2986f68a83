"""Sets of pages as runs: sorted, disjoint ``(n, 2)`` arrays of ``[start, stop)`` page numbers.

A snapshot's block table may claim far more RAM than the file holds, so nothing here is sized by
the pages a set could hold, only by its runs (and a mapped-ram bitmap, which is in the file, by
its bytes): which pages hold data, which are zero, which were sent as PAGE although all zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bitmap_runs", "intersect", "merge", "pack_runs", "page_runs", "runs_of", "subtract", "uncovered"]

#: bitmap bytes unpacked at a time (half a million pages)
_BITMAP_STEP = 1 << 16


def empty() -> np.ndarray:
    return np.zeros((0, 2), np.int64)


def page_runs(mask: np.ndarray) -> np.ndarray:
    """The runs of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return edges.reshape(-1, 2).astype(np.int64)


def runs_of(pages: np.ndarray) -> np.ndarray:
    """The runs of consecutive numbers in sorted, distinct ``pages``."""
    if not pages.shape[0]:
        return empty()
    cut = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], cut))]
    stops = pages[np.concatenate((cut - 1, [pages.shape[0] - 1]))] + 1
    return np.stack([starts, stops], axis=1).astype(np.int64)


def merge(runs: np.ndarray) -> np.ndarray:
    """Runs sorted by start, those that touch or overlap joined."""
    if runs.shape[0] < 2:
        return runs.astype(np.int64).reshape(-1, 2)
    runs = runs[np.argsort(runs[:, 0], kind="stable")]
    head = np.concatenate(([True], runs[1:, 0] > np.maximum.accumulate(runs[:-1, 1])))
    ends = np.maximum.reduceat(runs[:, 1], np.flatnonzero(head))
    return np.stack([runs[head, 0], ends], axis=1).astype(np.int64)


def uncovered(runs: np.ndarray, first: int, last: int) -> np.ndarray:
    """The runs of ``[first, last)`` that ``runs`` leave out."""
    lo = int(np.searchsorted(runs[:, 1], first, side="right"))
    hi = int(np.searchsorted(runs[:, 0], last, side="left"))
    inside = runs[lo:hi]
    starts = np.maximum(np.concatenate(([first], inside[:, 1])), first)
    stops = np.minimum(np.concatenate((inside[:, 0], [last])), last)
    keep = stops > starts
    return np.stack([starts[keep], stops[keep]], axis=1).astype(np.int64)


def _members(runs: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether each of ``points`` lies in ``runs``."""
    if not runs.shape[0]:
        return np.zeros(points.shape[0], bool)
    at = np.searchsorted(runs[:, 0], points, side="right") - 1
    return (at >= 0) & (points < runs[np.maximum(at, 0), 1])


def _combine(a: np.ndarray, b: np.ndarray, in_b: bool) -> np.ndarray:
    points = np.unique(np.concatenate((a.ravel(), b.ravel())))
    if points.shape[0] < 2:
        return empty()
    starts, stops = points[:-1], points[1:]
    keep = _members(a, starts) & (_members(b, starts) == in_b)
    return merge(np.stack([starts[keep], stops[keep]], axis=1))


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pages in both ``a`` and ``b``."""
    return _combine(a, b, True)


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pages in ``a`` and not in ``b``."""
    return _combine(a, b, False)


def bitmap_runs(bitmap: np.ndarray, npages: int) -> tuple[np.ndarray, bool]:
    """The runs of set bits among the first ``npages`` bits of ``bitmap`` (``uint8``, LSB first,
    as a mapped-ram file's), and whether every bit past them is clear. Unpacked a bounded piece
    at a time."""
    parts = [empty()]
    clear = True
    for first in range(0, bitmap.shape[0], _BITMAP_STEP):
        bits = np.unpackbits(bitmap[first : first + _BITMAP_STEP], bitorder="little").astype(bool)
        valid = max(0, min(bits.shape[0], npages - first * 8))
        clear &= not bits[valid:].any()
        parts.append(page_runs(bits[:valid]) + first * 8)
    return merge(np.concatenate(parts)), bool(clear)


def pack_runs(runs: np.ndarray | None, count: int) -> bytes:
    """The bits of ``count`` pages (LSB first, as ``np.packbits(mask, bitorder="little")``), set
    in ``runs``; empty when no page is set. Built from the runs, without a mask of the pages."""
    if runs is None or not runs.shape[0]:
        return b""
    nbytes = -(-count // 8)
    a, b = runs[:, 0], runs[:, 1]
    fa, fb = -(-a // 8), b // 8
    whole = fb > fa
    steps = np.zeros(nbytes + 1, np.int8)
    np.add.at(steps, fa[whole], 1)
    np.add.at(steps, fb[whole], -1)
    packed = np.where(np.cumsum(steps[:-1], dtype=np.int8) > 0, 0xFF, 0).astype(np.uint8)
    # the bits of the bytes a run only partly covers: its head and its tail
    for lo, hi in ((a, np.minimum(b, 8 * fa)), (np.maximum(a, 8 * fb), b)):
        part = hi > lo
        lo, hi = lo[part], hi[part]
        np.bitwise_or.at(packed, lo // 8, (((1 << (hi - lo)) - 1) << (lo % 8)).astype(np.uint8))
    return packed.tobytes()
