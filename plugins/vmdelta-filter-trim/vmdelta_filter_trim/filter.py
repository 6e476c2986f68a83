"""The ``trim`` filter: drop disk units the guest discarded after their last write."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import pluggy

from vmdelta_core.plugin import ConfigError, Filter, FilterContext, FilterResult, units_covered
from vmdelta_filter_trim.parsers import TraceParser
from vmdelta_filter_trim.trace import collect_parsers, discarded_ranges, read_trace

__all__ = ["TrimFilter"]


class TrimFilter(Filter):
    """Drops a changed unit when every byte of it was discarded later than it was last written.

    That is the original rule (a unit fully covered by a discard later than its last write),
    made exact per byte: a write that touches part of a unit after the discard keeps the unit,
    and a unit covered by two adjacent discards counts as covered. Partly discarded units stay.

    :param parsers: extra trace parsers (besides the builtin ones and those of plugins).
    :param plugin_manager: whose plugins' ``vmdelta_trim_trace_parsers`` hooks to ask for more;
        the registry passes the manager it collects from. Without one, only the builtin parsers
        and ``parsers`` are used.
    """

    name = "trim"
    option_names = frozenset({"after", "before"})
    kinds: ClassVar[frozenset[str]] = frozenset({"disk"})
    needs_input = True

    def __init__(self, parsers: Iterable[TraceParser] = (), plugin_manager: pluggy.PluginManager | None = None) -> None:
        self._extra = tuple(parsers)
        self._pm = plugin_manager

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        # the core calls select only on a disk image and with an input (kinds, needs_input)
        assert context.input is not None
        parsers = collect_parsers(self._pm, self._extra)
        log = read_trace(context.input, parsers)
        size = context.modified.size
        _check_fits(log.events, size, context)
        ranges, counts = discarded_ranges(log.events, context.options)
        starts, ends = ranges.arrays()
        candidates = np.asarray(candidates, dtype=np.int64)
        drop = units_covered(starts, ends, candidates, context.unit_size, size)
        details: dict[str, Any] = {
            "trace_lines": log.lines,
            "unrecognised_lines": log.unrecognised,
            "events_by_parser": dict(log.by_parser),
            **counts,
            "discarded_bytes": ranges.total(),
            "candidates": int(candidates.size),
            "dropped": int(np.count_nonzero(drop)),
        }
        return FilterResult(drop=drop, reason="trim", details=details)


def _check_fits(events: Iterable[Any], size: int, context: FilterContext) -> None:
    """A request beyond the end of the image means the log belongs to another disk."""
    worst = max((e.offset + e.length for e in events if e.op != "other"), default=0)
    if worst > size:
        raise ConfigError(
            f"trim: {context.input} has a request ending at byte {worst}, beyond the {size}-byte "
            f"disk {context.image_name}: the log is of another disk"
        )
