"""The ``freepfn`` filter: drop changed memory units that lie in free guest page frames."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from vmdelta_core.plugin import ConfigError, Filter, FilterContext, FilterResult, units_covered
from vmdelta_filter_freepfn.frames import FORMATS, FreeFrames, read_free_frames
from vmdelta_filter_freepfn.ramlayout import RamSegments, below_4g_option, inside_ram, ram_pages, ram_segments

__all__ = ["FreePfnFilter", "filter_options", "free_image_ranges"]

#: option ``page_size`` bounds: Linux pages are 4 KiB (x86) up to 256 KiB (hexagon)
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 20


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
    option_names: ClassVar[frozenset[str]] = frozenset({"format", "page_size", "below_4g"})

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        # the core calls select only on a memory image and with an input (kinds, needs_input)
        assert context.input is not None
        options = context.options
        fmt, page_size = filter_options(options)
        size = context.modified.size
        segments, described = ram_segments(context.modified.layout, size, options)
        frames = read_free_frames(context.input, ram_pages(segments, page_size), fmt)
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


def filter_options(options: Mapping[str, Any]) -> tuple[str, int]:
    """Check every option before any file is read; returns ``format`` and ``page_size``.

    :raises ConfigError: an option the filter does not know, or a value out of its range.
    """
    known = FreePfnFilter.option_names
    unknown = sorted(str(key) for key in options if key not in known)
    if unknown:
        raise ConfigError(f"freepfn: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    fmt = options.get("format", "auto")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ConfigError(f"freepfn: option format={fmt!r} must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    page_size = options.get("page_size", 4096)
    if (
        isinstance(page_size, bool)
        or not isinstance(page_size, int)
        or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
        or page_size & (page_size - 1)
    ):
        raise ConfigError(f"freepfn: option page_size={page_size!r} must be a power of two from 4096 to 1048576")
    below_4g_option(options)
    return fmt, page_size


def free_image_ranges(
    frames: FreeFrames, segments: RamSegments, page_size: int, context: FilterContext | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The free frames as merged byte ranges of the memory image.

    :raises ConfigError: a free frame lies outside every RAM segment (a list of another VM, or
        of a guest with more RAM than this image holds).
    """
    # checked here too, for frames not from read_free_frames: after this every PFN is at most
    # 2^56 / page_size, so the byte addresses below cannot overflow int64
    outside = np.flatnonzero(~inside_ram(ram_pages(segments, page_size), frames.starts, frames.counts))
    if outside.size:
        first = int(outside[0])
        where = f" for {context.image_name}" if context is not None else ""
        ram = int(segments[:, 1].sum())
        raise ConfigError(
            f"freepfn: free PFN range {int(frames.starts[first])}+{int(frames.counts[first])} is not guest RAM"
            f"{where} ({ram // (1 << 20)} MiB mapped): the list is of another VM or of a bigger guest"
        )
    lo = frames.starts * page_size
    hi = (frames.starts + frames.counts) * page_size
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    for address, length, offset in segments.tolist():
        s = np.maximum(lo, address)
        e = np.minimum(hi, address + length)
        inside = s < e
        pieces.append((s[inside] - address + offset, e[inside] - address + offset))
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
