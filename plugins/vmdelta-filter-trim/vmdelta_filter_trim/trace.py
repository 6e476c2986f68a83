"""Reading a trace log and replaying it into the byte ranges that were discarded last."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pluggy

from vmdelta_core.plugin import ConfigError, FormatError, PluginError
from vmdelta_filter_trim.parsers import BUILTIN_PARSERS, DISCARD, WRITE, TraceEvent, TraceParser
from vmdelta_filter_trim.ranges import ByteRanges, last_discarded

_LAST_BYTE = 2**63 - 1

__all__ = ["TraceLog", "collect_parsers", "discarded_ranges", "read_trace"]


@attrs.frozen
class TraceLog:
    """The events of one log in file order, and what the parsers made of its lines."""

    events: list[TraceEvent]
    lines: int
    unrecognised: int
    by_parser: Mapping[str, int]


def collect_parsers(pm: pluggy.PluginManager | None, extra: Iterable[TraceParser] = ()) -> list[TraceParser]:
    """The builtin parsers, then ``extra``, then those the plugins of ``pm`` register."""
    found: list[TraceParser] = [*BUILTIN_PARSERS, *extra]

    def register(parser: TraceParser) -> None:
        if not isinstance(parser, TraceParser) or not isinstance(parser.name, str):
            raise PluginError(f"a trace parser needs a name and a parse_line method, got {parser!r}")
        found.append(parser)

    # no such hook when no plugin of ``pm`` implements it and the trim plugin is not one of them
    caller = getattr(pm.hook, "vmdelta_trim_trace_parsers", None) if pm is not None else None
    if caller is not None:
        caller(register=register)
    names = [parser.name for parser in found]
    for name in names:
        if names.count(name) > 1:
            raise PluginError(f"trace parser {name!r} is registered twice")
    return found


def read_trace(path: Path, parsers: Sequence[TraceParser]) -> TraceLog:
    """Parse every line of ``path``; a line no parser knows is counted, not fatal.

    :raises ConfigError: the file cannot be read or no line is a known trace event.
    :raises FormatError: a line of a known format is damaged (with its line number).
    """
    events: list[TraceEvent] = []
    by_parser = {parser.name: 0 for parser in parsers}
    unrecognised = 0
    number = 0
    try:
        # line by line (a line ends at a line feed): memory follows the events, not the log
        with open(path, encoding="utf-8", errors="replace", newline="\n") as text:
            for number, raw in enumerate(text, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                for parser in parsers:
                    try:
                        event = parser.parse_line(line)
                    except FormatError as exc:
                        raise FormatError(f"trim: {path} line {number}: {exc}") from None
                    if event is not None:
                        events.append(event)
                        by_parser[parser.name] += 1
                        break
                else:
                    unrecognised += 1
    except OSError as exc:
        raise ConfigError(f"trim: cannot read trace log {path}: {exc.strerror}") from None
    if not events:
        known = ", ".join(parser.name for parser in parsers)
        raise ConfigError(f"trim: no line of {path} is a trace event it understands ({known})")
    return TraceLog(events, number, unrecognised, {k: v for k, v in by_parser.items() if v})


def _window(value: Any, what: str) -> int | None:
    """An option ``after``/``before``: integer microseconds or ``"SEC.USEC"``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value)
    sec, _, usec = text.partition(".")
    if not sec.isdigit() or (usec and not usec.isdigit()) or len(usec) > 6:
        raise ConfigError(f"trim: option {what}={value!r} is not SEC.USEC or integer microseconds")
    return int(sec) * 1_000_000 + int(usec or "0")


def discarded_ranges(
    events: Sequence[TraceEvent], options: Mapping[str, Any] | None = None
) -> tuple[ByteRanges, dict[str, int]]:
    """Replay writes and discards in time order: what is left is every byte whose last request
    was a discard. Equal timestamps keep file order (Python's sort is stable).

    Options ``after`` and ``before`` keep only requests in that window (for a log that runs past
    the snapshots).
    """
    options = options or {}
    after = _window(options.get("after"), "after")
    before = _window(options.get("before"), "before")
    counts = {"writes": 0, "discards": 0, "other": 0, "outside_window": 0}
    starts: list[int] = []
    ends: list[int] = []
    discard: list[bool] = []
    for event in sorted(events, key=lambda e: e.time_us):
        if (after is not None and event.time_us < after) or (before is not None and event.time_us > before):
            counts["outside_window"] += 1
        elif event.op in (DISCARD, WRITE):
            counts["discards" if event.op == DISCARD else "writes"] += 1
            starts.append(min(event.offset, _LAST_BYTE))  # no image reaches past 2**63
            ends.append(min(event.offset + event.length, _LAST_BYTE))
            discard.append(event.op == DISCARD)
        else:
            counts["other"] += 1
    return last_discarded(np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), np.array(discard)), counts
