"""The ``freepfn`` filter: drop changed memory units that lie in free guest page frames."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from vmdelta_core.components import Filter, FilterContext, FilterResult
from vmdelta_core.errors import ConfigError
from vmdelta_filter_freepfn.frames import FreeFrames, read_free_frames
from vmdelta_filter_freepfn.ramlayout import RamSegments, ram_segments

__all__ = ["FreePfnFilter", "free_image_ranges", "units_covered"]


class FreePfnFilter(Filter):
    """Drops a changed memory unit when all its bytes are in page frames the guest had free.

    The free list must be taken at the instant of the modified snapshot (the VM stopped); a
    page the guest frees is content it will overwrite before reading, so rebuilding it from the
    base is safe. Options: ``format`` (``auto``/``ranges``/``kpageflags``), ``page_size``
    (default 4096) and ``below_4g`` (see :mod:`vmdelta_filter_freepfn.ramlayout`).
    """

    name = "freepfn"
    kinds: ClassVar[frozenset[str]] = frozenset({"memory"})
    needs_input = True

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        if context.kind != "memory":
            raise ConfigError(f"freepfn: {context.image_name} is a {context.kind} image; free page frames are memory")
        if context.input is None:
            raise ConfigError("freepfn needs the free page frames: --filter freepfn:FREE-PFNS.txt")
        options = context.options
        page_size = options.get("page_size", 4096)
        if not isinstance(page_size, int) or page_size <= 0 or page_size & (page_size - 1):
            raise ConfigError(f"freepfn: option page_size={page_size!r} must be a power of two")
        frames = read_free_frames(context.input, str(options.get("format", "auto")))
        size = context.modified.size
        segments, described = ram_segments(context.modified.layout, size, options)
        starts, ends = free_image_ranges(frames, segments, page_size, context)
        candidates = np.asarray(candidates, dtype=np.int64)
        drop = units_covered(starts, ends, candidates, context.unit_size, size)
        details: dict[str, Any] = {
            "input_format": frames.format,
            "free_pages": frames.pages,
            "free_ranges": int(frames.starts.size),
            "page_size": page_size,
            "ram_layout": described,
            "ram_segments": segments.tolist(),
            "candidates": int(candidates.size),
            "dropped": int(np.count_nonzero(drop)),
        }
        return FilterResult(drop=drop, reason="free-page", details=details)


def free_image_ranges(
    frames: FreeFrames, segments: RamSegments, page_size: int, context: FilterContext | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The free frames as merged byte ranges of the memory image.

    :raises ConfigError: a free frame lies outside every RAM segment (a list of another VM, or
        of a guest with more RAM than this image holds).
    """
    lo = frames.starts * page_size
    hi = (frames.starts + frames.counts) * page_size
    mapped = np.zeros(lo.shape, dtype=np.int64)
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    for address, length, offset in segments.tolist():
        s = np.maximum(lo, address)
        e = np.minimum(hi, address + length)
        inside = s < e
        mapped += np.where(inside, e - s, 0)
        pieces.append((s[inside] - address + offset, e[inside] - address + offset))
    outside = np.flatnonzero(mapped < hi - lo)
    if outside.size:
        first = int(outside[0])
        where = f" for {context.image_name}" if context is not None else ""
        ram = int(segments[:, 1].sum())
        raise ConfigError(
            f"freepfn: free PFN range {int(frames.starts[first])}+{int(frames.counts[first])} is not guest RAM"
            f"{where} ({ram // (1 << 20)} MiB mapped): the list is of another VM or of a bigger guest"
        )
    starts = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, dtype=np.int64)
    ends = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    if starts.size == 0:
        return starts, ends
    # merge touching ranges: a new run starts where the start is beyond every end so far
    reach = np.maximum.accumulate(ends)
    new = np.concatenate(([True], starts[1:] > reach[:-1]))
    group = np.cumsum(new) - 1
    merged_starts = starts[new]
    merged_ends = np.zeros(merged_starts.shape, dtype=np.int64)
    np.maximum.at(merged_ends, group, ends)
    return merged_starts, merged_ends


def units_covered(starts: np.ndarray, ends: np.ndarray, units: np.ndarray, unit_size: int, size: int) -> np.ndarray:
    """Mask of ``units`` whose bytes (clipped to ``size``) lie entirely inside one merged range."""
    lo = units * unit_size
    hi = np.minimum(lo + unit_size, size)
    if starts.size == 0 or units.size == 0:
        return np.zeros(units.shape, dtype=bool)
    i = np.searchsorted(starts, lo, side="right") - 1
    return (i >= 0) & (ends[np.clip(i, 0, None)] >= hi) & (hi > lo)
