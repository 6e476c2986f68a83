"""Trace-log line parsers: one QEMU trace event (or legacy log format) each.

A parser turns one log line into a :class:`TraceEvent` or says the line is not its format. The
timestamps are integer microseconds: the fraction after the dot is read as a whole number of
microseconds, never as a float, so ``5.12`` (an unpadded ``tv_usec`` of 12) and ``5.000012`` are
the same instant and ordering stays exact.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Protocol, runtime_checkable

from vmdelta_core.plugin import FormatError

__all__ = [
    "BUILTIN_PARSERS",
    "DISCARD",
    "OTHER",
    "WRITE",
    "LegacyDiscardParser",
    "NbdRequestParser",
    "TraceEvent",
    "TraceParser",
    "parse_timestamp",
]

WRITE = "write"
DISCARD = "discard"
#: a request that neither writes nor discards (read, flush, ...): recognised, then ignored
OTHER = "other"


class TraceEvent(NamedTuple):
    """One request of the trace: when, what, and which bytes of the disk image."""

    time_us: int
    op: str
    offset: int
    length: int


@runtime_checkable
class TraceParser(Protocol):
    """What a trace parser provides; register instances through ``vmdelta_trim_trace_parsers``.

    :cvar name: unique name, shown in the overlay header next to the counts it parsed.
    """

    name: str

    def parse_line(self, line: str) -> TraceEvent | None:
        """The event on ``line``, or ``None`` when the line is not in this parser's format.

        :raises FormatError: the line is this parser's format but damaged (say a bad number).
        """
        ...


def parse_timestamp(seconds: str, micros: str) -> int:
    """``SEC`` and the digits after the dot as integer microseconds (up to six digits)."""
    if len(micros) > 6:
        raise FormatError(f"timestamp {seconds}.{micros} has more than six digits of microseconds")
    return int(seconds) * 1_000_000 + int(micros or "0")


class NbdRequestParser:
    """QEMU's NBD client event ``nbd_send_request`` (``log`` trace backend), QEMU 7.2 to 10.x.

    ``PID@SEC.USEC:nbd_send_request Sending request to server: { .from = OFFSET, .len = LENGTH,
    .handle = H, .flags = 0x0, .type = 4 (trim) }``; QEMU 10 says ``.cookie`` for ``.handle``.
    Type 1 (write) and 6 (write zeroes) define the content of their bytes; 4 (trim) discards
    them; every other type is recognised and ignored.
    """

    name = "nbd_send_request"
    # three patterns, each matched or searched once: one pattern with two lazy ``.*?`` took time
    # quadratic in the line (38 s for a damaged line of 336 KB); numbers of at most 20 digits
    # (a u64), so that int() never meets a number Python refuses to convert
    _head = re.compile(r"(?:\d{1,20}@)?(?P<sec>\d{1,20})\.(?P<usec>\d{1,20}):nbd_send_request\b")
    _range = re.compile(r"\.from\s*=\s*(?P<offset>\d{1,20}),\s*\.len\s*=\s*(?P<length>\d{1,20}),")
    _type = re.compile(r"\.type\s*=\s*(?P<type>\d{1,20})")
    _ops = {1: WRITE, 4: DISCARD, 6: WRITE}

    def parse_line(self, line: str) -> TraceEvent | None:
        if "nbd_send_request" not in line:
            return None
        head = self._head.match(line)
        fields = self._range.search(line, head.end()) if head else None
        kind = self._type.search(line, fields.end()) if fields else None
        if head is None or fields is None or kind is None:
            if "Sending request" in line:
                raise FormatError(f"nbd_send_request line not understood: {line[:120]!r}")
            return None
        return TraceEvent(
            parse_timestamp(head["sec"], head["usec"]),
            self._ops.get(int(kind["type"]), OTHER),
            int(fields["offset"]),
            int(fields["length"]),
        )


class LegacyDiscardParser:
    """The original VM-synthesis log: ``time:SEC.USEC, bdrv_discard, sector_num:N, sector_size:M``.

    ``N`` is the first 512-byte sector and ``M`` the number of sectors; its microseconds were
    written unpadded, which :func:`parse_timestamp` reads correctly. ``bdrv_write`` lines of the
    same shape are writes.
    """

    name = "bdrv_discard"
    _pattern = re.compile(
        r"^\s*time:\s*(?P<sec>\d{1,20})\.(?P<usec>\d{1,20}),\s*(?P<event>bdrv_discard|bdrv_write|bdrv_aio_writev),"
        r"\s*sector_num:\s*(?P<sector>\d{1,20}),\s*sector_size:\s*(?P<count>\d{1,20})"
    )

    def parse_line(self, line: str) -> TraceEvent | None:
        if "bdrv_" not in line:
            return None
        match = self._pattern.match(line)
        if match is None:
            return None
        op = DISCARD if match["event"] == "bdrv_discard" else WRITE
        return TraceEvent(
            parse_timestamp(match["sec"], match["usec"]), op, int(match["sector"]) * 512, int(match["count"]) * 512
        )


BUILTIN_PARSERS: tuple[TraceParser, ...] = (NbdRequestParser(), LegacyDiscardParser())
