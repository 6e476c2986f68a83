"""Change detection: which units of the modified image differ from the base, found with numpy.

Whole 16 MiB chunks are compared as ``uint64`` words over the two maps; chunks that are holes in
both images are skipped without being read, and when the source gives change hints (a qcow2
overlay's allocated clusters) only those units are compared at all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vmdelta_core.components import SourceImage
from vmdelta_core.index import hole_runs, intersect_runs, iter_chunks
from vmdelta_core.overlay.digest import ImageDigest

__all__ = ["changed_units"]

ProgressFn = Callable[[int], None]


def _differ(a: np.ndarray, b: np.ndarray, unit: int) -> np.ndarray:
    """Row-wise inequality of two equally long runs of whole units."""
    if unit % 8 == 0:
        return (a.view(np.uint64).reshape(-1, unit // 8) != b.view(np.uint64).reshape(-1, unit // 8)).any(axis=1)
    return (a.reshape(-1, unit) != b.reshape(-1, unit)).any(axis=1)


def changed_units(
    base: SourceImage,
    modified: SourceImage,
    unit: int,
    progress: ProgressFn | None = None,
    *,
    use_hints: bool = True,
    digest: ImageDigest | None = None,
    start: int = 0,
    stop: int | None = None,
) -> np.ndarray:
    """Sorted ``int64`` indices of the modified image's units whose bytes differ from the base's.

    The base is read as zero-padded past its end, so a grown image's new units count as changed
    unless they are zero. When ``digest`` is given and the whole image is compared (no hints), it
    is fed the modified image on the way, which spares a second pass over it.

    :param start: compare only units ``[start, stop)`` (a shard of the image); ``digest`` is then
        fed that range's bytes.
    """
    msize, bsize = modified.size, base.size
    count = -(-msize // unit)
    stop = count if stop is None else min(stop, count)
    if use_hints and modified.hints is not None:
        if digest is not None:
            raise ValueError("a digest cannot be taken while only hinted units are read")
        hints = np.asarray(modified.hints, dtype=np.int64)
        return _changed_among(base, modified, unit, hints[(hints >= start) & (hints < stop)], progress)

    common = min(msize, bsize) // unit  # units wholly inside both images
    ends = -(-bsize // unit)  # units from here on lie past the base's end: it reads as zeros there
    holes = hole_runs(modified, unit, count)
    beyond_base = np.array([[ends, max(ends, count)]], dtype=np.int64)
    both_holes = intersect_runs(holes, np.concatenate([hole_runs(base, unit, ends), beyond_base]))
    found: list[np.ndarray] = []
    mdata, bdata = modified.data, base.data
    for first, end, is_hole in iter_chunks(modified, unit, both_holes, min(start, common), min(stop, common)):
        lo, hi = first * unit, end * unit
        if not is_hole:
            diff = _differ(mdata[lo:hi], bdata[lo:hi], unit)
            found.append(first + np.flatnonzero(diff))
            if digest is not None:
                digest.update(mdata[lo:hi])
            modified.release(lo, hi)
            base.release(lo, hi)
        elif digest is not None:
            digest.update_zeros(hi - lo)  # a hole in the modified image reads as zeros
        if progress is not None:
            progress((end - first) * unit)
    # the tail: units past the end of the base (compared with zeros; holes there are zeros on
    # both sides) and partial units
    tail = intersect_runs(holes, beyond_base)
    for first, end, is_hole in iter_chunks(modified, unit, tail, max(start, common), stop):
        lo, hi = first * unit, min(end * unit, msize)
        if is_hole:
            if digest is not None:
                digest.update_zeros(hi - lo)
        else:
            found.append(_changed_among(base, modified, unit, np.arange(first, end, dtype=np.int64), None))
            if digest is not None:
                digest.update(mdata[lo:hi])
            modified.release(lo, hi)
        if progress is not None:
            progress(hi - lo)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _changed_among(
    base: SourceImage, modified: SourceImage, unit: int, indices: np.ndarray, progress: ProgressFn | None
) -> np.ndarray:
    """Which of ``indices`` differ, comparing unit by unit in vectorized batches."""
    msize, bsize = modified.size, base.size
    count = -(-msize // unit)
    indices = indices[(indices >= 0) & (indices < count)]
    full_both = min(msize, bsize) // unit
    fast = indices[indices < full_both]
    out: list[np.ndarray] = []
    if fast.size:
        mview = modified.data[: full_both * unit].reshape(-1, unit)
        bview = base.data[: full_both * unit].reshape(-1, unit)
        for pos in range(0, fast.size, 4096):
            batch = fast[pos : pos + 4096]
            out.append(batch[_differ(mview[batch].reshape(-1), bview[batch].reshape(-1), unit)])
            if progress is not None:
                progress(batch.size * unit)
    # units wholly past the end of the base and wholly inside the modified: changed unless zero
    beyond = indices[(indices >= -(-bsize // unit)) & (indices < msize // unit)]
    if beyond.size:
        mview = modified.data[: (msize // unit) * unit].reshape(-1, unit)
        for pos in range(0, beyond.size, 4096):
            batch = beyond[pos : pos + 4096]
            out.append(batch[mview[batch].any(axis=1)])
    slow = np.setdiff1d(indices[indices >= full_both], beyond, assume_unique=True)
    if slow.size:
        keep = []
        for index in slow.tolist():
            start = index * unit
            length = min(unit, msize - start)
            if modified.padded(start, length) != base.padded(start, length):
                keep.append(index)
        out.append(np.array(keep, dtype=np.int64))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)
