"""Fuzzing the trace-log parsers and the replay of their requests.

Structure-aware: logs are made of real line formats (QEMU 7.2 and 10 ``nbd_send_request``, the
original ``bdrv_discard`` log) with known events, mixed with damaged lines (fields replaced by
huge or odd numbers, parts cut or repeated, very long lines, bad UTF-8, CR LF endings). The log is
read and filtered under the fuzz contract; when accepted, every valid line must have given its
event, every range lies inside the disk and the units dropped are exactly those a byte-per-byte
model of the replay says.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from trim_helpers import array_context
from vmdelta_filter_trim import DISCARD, OTHER, WRITE, ByteRanges, TraceEvent, TrimFilter, read_trace
from vmdelta_filter_trim.parsers import BUILTIN_PARSERS, LegacyDiscardParser, NbdRequestParser
from vmdelta_filter_trim.ranges import last_discarded

from vmdelta_core.plugin import ConfigError, FormatError, VmdeltaError
from vmdelta_core.testing import check_untrusted, fuzz_settings

SIZE = 1 << 20  # the disk the logs are replayed against
UNIT = 4096
NBD_TYPES = {1: WRITE, 4: DISCARD, 6: WRITE, 0: OTHER, 3: OTHER}


def nbd_line(event: TraceEvent, kind: int, qemu10: bool) -> str:
    sec, usec = divmod(event.time_us, 1_000_000)
    cookie = ".cookie" if qemu10 else ".handle"
    return (
        f"4242@{sec}.{usec:06d}:nbd_send_request Sending request to server: {{ .from = {event.offset}, "
        f".len = {event.length}, {cookie} = 7, .flags = 0x0, .type = {kind} (x) }}"
    )


def legacy_line(event: TraceEvent) -> str:
    sec, usec = divmod(event.time_us, 1_000_000)
    name = "bdrv_discard" if event.op == DISCARD else "bdrv_write"
    return f"time:{sec}.{usec}, {name}, sector_num:{event.offset // 512}, sector_size:{event.length // 512}"


@st.composite
def valid_lines(draw: Any) -> tuple[str, TraceEvent]:
    """A line of a known format and the event it stands for."""
    time_us = draw(st.integers(0, 20)) * 1_000_000 + draw(st.integers(0, 999_999))
    if draw(st.booleans()):  # legacy: whole sectors, unpadded microseconds
        sector = draw(st.integers(0, SIZE // 512 - 1))
        count = draw(st.integers(0, min(64, SIZE // 512 - sector)))
        event = TraceEvent(time_us, draw(st.sampled_from([DISCARD, WRITE])), sector * 512, count * 512)
        return legacy_line(event), event
    kind = draw(st.sampled_from(sorted(NBD_TYPES)))
    offset = draw(st.one_of(st.integers(0, SIZE // 512 - 1).map(lambda s: s * 512), st.integers(0, SIZE - 1)))
    length = draw(st.integers(0, min(16 * UNIT, SIZE - offset)))
    event = TraceEvent(time_us, NBD_TYPES[kind], offset, length)
    return nbd_line(event, kind, draw(st.booleans())), event


DIGITS = ["0", "18446744073709551615", "18446744073709551616", "9" * 25, "9" * 5000, "-1", "0x10", "", "1e9", "٣"]


def damaged(draw: Any, line: str) -> str:
    """The line with a number replaced, a part cut, repeated or garbled."""
    how = draw(st.sampled_from(["number", "cut", "repeat", "bytes", "long", "junk"]))
    if how == "number":
        for field in (".from = ", ".len = ", ".type = ", "sector_num:", "sector_size:", "@", "time:"):
            if field in line and draw(st.booleans()):
                head, _, tail = line.partition(field)
                digits = len(tail) - len(tail.lstrip("0123456789"))
                return head + field + draw(st.sampled_from(DIGITS)) + tail[digits:]
        return line.replace(".", draw(st.sampled_from(["", ",", ".."])), 1)
    if how == "cut":
        return line[: draw(st.integers(0, len(line)))]
    if how == "repeat":
        part = draw(st.sampled_from([".from = 1, .len = 2, ", "nbd_send_request ", ".type = 4 ", "time:1.2, "]))
        at = draw(st.integers(0, len(line)))
        return line[:at] + part * draw(st.sampled_from([1, 2, 50, 4000])) + line[at:]
    if how == "bytes":
        at = draw(st.integers(0, max(0, len(line) - 1)))
        return line[:at] + draw(st.sampled_from(["\0", "\udcff", "\u2028", "\x85", "\r", "é"])) + line[at + 1 :]
    if how == "long":
        return line + " " * draw(st.sampled_from([1000, 100_000]))
    return draw(st.sampled_from(["", "   ", "garbage", "nbd_send_request", "bdrv_discard", "Sending request"]))


class Log:
    """A generated trace log: its lines, and the event each valid line stands for."""

    def __init__(self, lines: list[str], events: list[TraceEvent | None], newline: str) -> None:
        self.lines, self.events, self.newline = lines, events, newline

    def text(self) -> str:
        return self.newline.join(self.lines) + self.newline

    def __repr__(self) -> str:
        return f"Log({len(self.lines)} lines, {sum(e is not None for e in self.events)} valid)"


@st.composite
def trace_logs(draw: Any) -> Log:
    lines: list[str] = []
    events: list[TraceEvent | None] = []
    for _ in range(draw(st.integers(0, 40))):
        line, event = draw(valid_lines())
        if draw(st.integers(0, 4)) == 0:
            line, event = damaged(draw, line), None
        lines.append(line)
        events.append(event)
    return Log(lines, events, draw(st.sampled_from(["\n", "\r\n"])))


def model_drop(events: list[TraceEvent], units: np.ndarray) -> np.ndarray:
    """Replay on one flag per byte: the definition the filter must meet."""
    discarded = np.zeros(SIZE, dtype=bool)
    for event in sorted(events, key=lambda e: e.time_us):
        if event.op in (DISCARD, WRITE):
            discarded[event.offset : event.offset + event.length] = event.op == DISCARD
    return np.array([discarded[u * UNIT : (u + 1) * UNIT].all() for u in units.tolist()])


FILTER = TrimFilter()
UNITS = np.arange(SIZE // UNIT, dtype=np.int64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = tmp_path_factory.mktemp("trim-fuzz")
    warm = found / "warm.log"  # the first select registers the filter's hook: not the log's cost
    warm.write_text(legacy_line(TraceEvent(1, DISCARD, 0, 512)) + "\n")
    FILTER.select(array_context(SIZE, warm), UNITS)
    return found


@fuzz_settings(150)
@given(log=trace_logs())
def test_fuzz_trim(folder: Path, log: Log) -> None:
    path = folder / "trace.log"
    path.write_bytes(log.text().encode("utf-8", "surrogateescape"))
    context = array_context(SIZE, path)
    # design bound: one event (a named tuple) per line and the replay's arrays, both at most a
    # few times the log's bytes, read line by line; a mask over the candidates
    bound = (1 << 20) + 16 * path.stat().st_size
    result = check_untrusted("trim trace log", lambda: FILTER.select(context, UNITS), memory=bound)
    valid = [e for e in log.events if e is not None]
    if isinstance(result, VmdeltaError):
        assert "\n" not in str(result)
        assert not valid or len(valid) < len(log.lines), f"a log of valid lines only was refused: {result}"
        return
    filtered, parsed = result, read_trace(path, list(BUILTIN_PARSERS))
    assert parsed.lines == len(log.lines)
    for event in valid:  # every valid line gave its event (a damaged line may still parse)
        assert event in parsed.events
    assert all(e.offset >= 0 and e.offset + e.length <= SIZE for e in parsed.events if e.op != OTHER)
    assert np.array_equal(filtered.drop, model_drop(parsed.events, UNITS))
    assert filtered.details["discarded_bytes"] <= SIZE


@fuzz_settings(300)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 40)),
        max_size=60,
    )
)
def test_fuzz_replay_matches_the_incremental_ranges(requests: list[tuple[bool, int, int]]) -> None:
    """The backwards replay gives what adding and removing ranges in time order gives."""
    incremental = ByteRanges()
    for discard, start, length in requests:
        (incremental.add if discard else incremental.remove)(start, start + length)
    starts = np.array([s for _, s, _ in requests], dtype=np.int64)
    ends = starts + np.array([n for _, _, n in requests], dtype=np.int64)
    replayed = check_untrusted("trim replay", lambda: last_discarded(starts, ends, [d for d, _, _ in requests]))
    assert (replayed.starts, replayed.ends) == (incremental.starts, incremental.ends)


# ------------------------------------------------------------------------------------------------
# what the fuzzers found, one regression test each


def test_a_long_damaged_nbd_line_is_refused_in_linear_time() -> None:
    """Two lazy ``.*?`` in one pattern: a line of 200 KB took 13 seconds (quadratic)."""
    line = "1@1.2:nbd_send_request Sending request to server: { " + ".from = 1, .len = 2, " * 10_000
    result = check_untrusted("trim trace log", lambda: NbdRequestParser().parse_line(line), seconds=2)
    assert isinstance(result, FormatError) and "not understood" in str(result)


@pytest.mark.parametrize("parser", [NbdRequestParser(), LegacyDiscardParser()])
def test_numbers_python_will_not_convert_are_not_events(parser: Any) -> None:
    """A number of 5000 digits was a ValueError (Python's int conversion limit) escaping."""
    digits = "9" * 5000
    lines = [
        f"1@1.2:nbd_send_request Sending request to server: {{ .from = {digits}, .len = 2, .type = 4 }}",
        f"time:5.1, bdrv_discard, sector_num:{digits}, sector_size:1",
    ]
    for line in lines:
        result = check_untrusted("trim trace log", lambda line=line: parser.parse_line(line))
        assert result is None or isinstance(result, FormatError)


def test_many_scattered_requests_replay_in_n_log_n() -> None:
    """Inserting into the middle of two lists per request: 200,000 discards in reverse order of
    offset took 8 seconds (and a million, minutes); the backwards replay takes about half of one."""
    n = 200_000
    starts = np.arange(n, 0, -1, dtype=np.int64) * 8192
    started = time.monotonic()
    ranges = last_discarded(starts, starts + 4096, np.ones(n, dtype=bool))
    assert len(ranges.starts) == n and time.monotonic() - started < 4


def test_a_log_is_read_line_by_line(tmp_path: Path) -> None:
    """The whole text and a list of its lines were held at once: 40 MB for a 20 MB log."""
    path = tmp_path / "trace.log"
    line = nbd_line(TraceEvent(1_000_000, DISCARD, 0, UNIT), 4, False)
    path.write_text(line + "\n" + ("unrelated trace line " * 50 + "\n") * 20_000)
    result = check_untrusted("trim trace log", lambda: read_trace(path, list(BUILTIN_PARSERS)), memory=2 << 20)
    assert not isinstance(result, VmdeltaError) and result.lines == 20_001 and result.unrecognised == 20_000


def test_a_directory_as_the_trace_log_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read trace log"):
        read_trace(tmp_path, list(BUILTIN_PARSERS))
