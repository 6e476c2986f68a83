"""Disjoint byte ranges that change as trace events are replayed."""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

__all__ = ["ByteRanges", "last_discarded"]


class ByteRanges:
    """Sorted, merged half-open ranges ``[start, end)``.

    Two parallel lists keep ``add`` and ``remove`` at one bisection plus a slice assignment, without
    a per-byte or per-sector bitmap (a sector bitmap of a 1 TiB disk would not fit in memory). A
    slice assignment moves the rest of the list, so many scattered requests cost quadratic time:
    a whole trace is replayed with :func:`last_discarded` instead.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect_left(self.ends, start)  # first range ending at or after start: touches
        j = bisect_right(self.starts, end)  # ranges starting at or before end
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect_right(self.ends, start)  # first range ending after start
        j = bisect_left(self.starts, end)  # ranges starting before end
        if i >= j:
            return
        keep_starts: list[int] = []
        keep_ends: list[int] = []
        if self.starts[i] < start:
            keep_starts.append(self.starts[i])
            keep_ends.append(start)
        if self.ends[j - 1] > end:
            keep_starts.append(end)
            keep_ends.append(self.ends[j - 1])
        self.starts[i:j] = keep_starts
        self.ends[i:j] = keep_ends

    @classmethod
    def of(cls, starts: np.ndarray, ends: np.ndarray) -> ByteRanges:
        """Ranges already sorted, merged and not touching."""
        ranges = cls()
        ranges.starts, ranges.ends = np.asarray(starts).tolist(), np.asarray(ends).tolist()
        return ranges

    def total(self) -> int:
        return sum(self.ends) - sum(self.starts)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.starts, dtype=np.int64), np.asarray(self.ends, dtype=np.int64)


def last_discarded(starts: np.ndarray, ends: np.ndarray, discard: np.ndarray) -> ByteRanges:
    """The bytes whose last request was a discard, for requests ``[start, end)`` in time order.

    Replayed backwards: the last request covering a byte decides it, so each request claims only
    the pieces no later request has claimed, found with a "next unclaimed piece" pointer per
    piece between two request boundaries (union-find). Time and memory follow the number of
    requests, whatever their order and however scattered they are.
    """
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    keep = ends > starts
    starts, ends, discard = starts[keep], ends[keep], np.asarray(discard, dtype=bool)[keep]
    if starts.size == 0:
        return ByteRanges()
    points = np.unique(np.concatenate([starts, ends]))
    first = np.searchsorted(points, starts).tolist()
    stop = np.searchsorted(points, ends).tolist()
    pieces = points.size - 1
    following = list(range(pieces + 1))  # the first unclaimed piece at or after each piece
    claimed = np.zeros(pieces, dtype=np.int8)  # 0 never requested, 1 discarded, 2 written
    verdicts = np.where(discard, 1, 2).tolist()

    def unclaimed(piece: int) -> int:
        root = piece
        while following[root] != root:
            root = following[root]
        while following[piece] != root:  # path compression
            following[piece], piece = root, following[piece]
        return root

    for k in range(len(first) - 1, -1, -1):
        piece, end, verdict = unclaimed(first[k]), stop[k], verdicts[k]
        while piece < end:
            claimed[piece] = verdict
            following[piece] = piece + 1
            piece = unclaimed(piece + 1)
    inside = claimed == 1
    edges = np.flatnonzero(np.diff(np.concatenate(([False], inside, [False])).astype(np.int8)))
    return ByteRanges.of(points[edges[0::2]], points[edges[1::2]])
