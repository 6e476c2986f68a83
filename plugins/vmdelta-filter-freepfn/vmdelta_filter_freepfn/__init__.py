"""vmdelta filter ``freepfn``: memory units in page frames the guest had free."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.plugin import Filter, hookimpl
from vmdelta_filter_freepfn.filter import FreePfnFilter, free_image_ranges
from vmdelta_filter_freepfn.frames import (
    FORMATS,
    KPF_BUDDY,
    FreeFrames,
    detect_format,
    parse_kpageflags,
    parse_ranges,
    read_free_frames,
)
from vmdelta_filter_freepfn.ramlayout import FOUR_GIB, ram_pages, ram_segments

__all__ = [
    "FORMATS",
    "FOUR_GIB",
    "KPF_BUDDY",
    "FreeFrames",
    "FreePfnFilter",
    "detect_format",
    "free_image_ranges",
    "parse_kpageflags",
    "parse_ranges",
    "ram_pages",
    "ram_segments",
    "read_free_frames",
]


@hookimpl
def vmdelta_register_filters(register: Callable[[Filter], None]) -> None:
    register(FreePfnFilter())
