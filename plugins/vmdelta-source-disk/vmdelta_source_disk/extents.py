"""Byte-range arithmetic and the sparse-file calls ``vmdelta_core.fileio`` does not have.

Ranges are ``(n, 2)`` int64 arrays. Here they are half-open ``[start, end)`` pairs ("spans"),
which make set operations simple; :func:`to_extents` turns them into the ``(start, length)``
extents the core uses. Every set operation is vectorized: a fragmented 100 GiB disk has a
million extents, and a Python loop per extent would cost seconds.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

__all__ = [
    "copy_range",
    "intersect",
    "normalize",
    "punch_hole",
    "subtract",
    "to_extents",
    "to_spans",
    "union",
    "unit_spans",
]

_EMPTY = np.zeros((0, 2), dtype=np.int64)


def to_spans(extents: np.ndarray) -> np.ndarray:
    """``(start, length)`` extents to ``[start, end)`` spans."""
    extents = np.asarray(extents, dtype=np.int64).reshape(-1, 2)
    return np.stack([extents[:, 0], extents[:, 0] + extents[:, 1]], axis=1)


def to_extents(spans: np.ndarray) -> np.ndarray:
    """``[start, end)`` spans to ``(start, length)`` extents."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return np.stack([spans[:, 0], spans[:, 1] - spans[:, 0]], axis=1)


def normalize(spans: np.ndarray) -> np.ndarray:
    """Sorted, disjoint, non-adjacent spans covering the same bytes (empty spans dropped)."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    spans = spans[spans[:, 1] > spans[:, 0]]
    if spans.shape[0] == 0:
        return _EMPTY.copy()
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    reach = np.maximum.accumulate(spans[:, 1])
    # a span starts a new group when it begins after everything before it has ended
    new = np.ones(spans.shape[0], dtype=bool)
    new[1:] = spans[1:, 0] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, spans.shape[0] - 1)
    return np.stack([spans[first, 0], reach[last]], axis=1)


def union(*parts: np.ndarray) -> np.ndarray:
    return normalize(np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in parts]))


def _combine(a: np.ndarray, b: np.ndarray, keep_a_only: bool) -> np.ndarray:
    a, b = normalize(a), normalize(b)
    if a.shape[0] == 0:
        return a
    if b.shape[0] == 0:
        return a if keep_a_only else _EMPTY.copy()
    points = np.unique(np.concatenate([a.ravel(), b.ravel()]))
    left, right = points[:-1], points[1:]

    def inside(spans: np.ndarray) -> np.ndarray:
        i = np.searchsorted(spans[:, 0], left, side="right") - 1
        return (i >= 0) & (left < spans[np.maximum(i, 0), 1])

    in_a, in_b = inside(a), inside(b)
    keep = in_a & ~in_b if keep_a_only else in_a & in_b
    return normalize(np.stack([left[keep], right[keep]], axis=1))


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bytes in ``a`` and not in ``b``."""
    return _combine(a, b, keep_a_only=True)


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bytes in both ``a`` and ``b``."""
    return _combine(a, b, keep_a_only=False)


def unit_spans(starts: np.ndarray, length: int, unit: int, limit: int) -> np.ndarray:
    """Sorted unique indices of the ``unit``-sized units that ``[start, start+length)`` touch."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.minimum(starts + length, limit)
    keep = ends > starts
    first, stop = starts[keep] // unit, (ends[keep] + unit - 1) // unit
    if first.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    counts = stop - first
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.unique(np.repeat(first, counts) + offsets)


# --------------------------------------------------------------------------------------------
# sparse files
# --------------------------------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: ctypes.CDLL | None = None


def _fallocate() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
    return func


def punch_hole(fd: int, start: int, length: int) -> bool:
    """Deallocate ``[start, start+length)`` (reads as zeros afterwards); False when unsupported."""
    func = _fallocate()
    if func is None or length <= 0:
        return False
    if func(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, length) == 0:
        return True
    if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def copy_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> int:
    """Copy bytes between files in the kernel where it can; returns how many (short at EOF)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = _copy_by_hand(src, dst, src_offset + done, dst_offset + done, length - done)
        if n == 0:  # end of the source file
            break
        done += n
    return done


def _copy_by_hand(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> int:
    done = 0
    while done < length:
        chunk = os.pread(src, min(length - done, 8 << 20), src_offset + done)
        if not chunk:
            break
        os.pwrite(dst, chunk, dst_offset + done)
        done += len(chunk)
    return done
