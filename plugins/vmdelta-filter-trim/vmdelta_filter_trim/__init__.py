"""vmdelta filter ``trim``: disk units the guest discarded, proven by a QEMU trace log."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from vmdelta_core.plugin import Filter, hookimpl
from vmdelta_filter_trim import hookspecs
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
from vmdelta_filter_trim.ranges import ByteRanges
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
]


@hookimpl
def vmdelta_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def vmdelta_register_filters(register: Callable[[Filter], None], pluginmanager: pluggy.PluginManager) -> None:
    # the filter asks the plugins of this very manager for trace parsers when it reads a trace
    register(TrimFilter(plugin_manager=pluginmanager))
