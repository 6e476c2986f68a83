"""Units against byte ranges: the arithmetic every filter that drops units by range needs."""

from __future__ import annotations

import numpy as np

__all__ = ["units_covered"]


def units_covered(starts: np.ndarray, ends: np.ndarray, units: np.ndarray, unit_size: int, size: int) -> np.ndarray:
    """Mask of ``units`` whose bytes, clipped to an image of ``size`` bytes, all lie inside one range.

    The ranges are half-open ``[starts[i], ends[i])``, sorted and merged (no two overlap or touch):
    two ranges that meet inside a unit would each cover only part of it. A unit at or past
    ``size`` has no bytes and is never covered; the short last unit is judged on the bytes it has.
    One ``searchsorted`` over all units: no Python loop per unit.

    :param starts: range starts, ``int64``, ascending.
    :param ends: range ends, ``int64``, in the same order.
    :param units: unit indices, any order.
    :returns: a boolean array shaped like ``units``.
    """
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    units = np.asarray(units, dtype=np.int64)
    if starts.size == 0 or units.size == 0:
        return np.zeros(units.shape, dtype=bool)
    lo = units * unit_size
    hi = np.minimum(lo + unit_size, size)
    i = np.searchsorted(starts, lo, side="right") - 1
    return (i >= 0) & (ends[np.clip(i, 0, None)] >= hi) & (hi > lo)
