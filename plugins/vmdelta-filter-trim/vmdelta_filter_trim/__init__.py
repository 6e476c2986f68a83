"""vmdelta filter ``trim``: disk units the guest discarded, proven by a QEMU trace log."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.components import Filter
from vmdelta_core.hookspecs import hookimpl
from vmdelta_filter_trim.filter import TrimFilter
from vmdelta_filter_trim.parsers import (
    DISCARD,
    OTHER,
    WRITE,
    LegacyDiscardParser,
    NbdRequestParser,
    TraceEvent,
    TraceParser,
    parse_timestamp,
)
from vmdelta_filter_trim.ranges import ByteRanges, units_covered
from vmdelta_filter_trim.trace import TraceLog, collect_parsers, discarded_ranges, read_trace

__all__ = [
    "DISCARD",
    "OTHER",
    "WRITE",
    "ByteRanges",
    "LegacyDiscardParser",
    "NbdRequestParser",
    "TraceEvent",
    "TraceLog",
    "TraceParser",
    "TrimFilter",
    "collect_parsers",
    "discarded_ranges",
    "parse_timestamp",
    "read_trace",
    "units_covered",
]


@hookimpl
def vmdelta_register_filters(register: Callable[[Filter], None]) -> None:
    register(TrimFilter())
