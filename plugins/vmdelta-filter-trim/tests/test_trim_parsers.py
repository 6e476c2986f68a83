from __future__ import annotations

import pytest
from vmdelta_filter_trim import (
    DISCARD,
    OTHER,
    WRITE,
    LegacyDiscardParser,
    NbdRequestParser,
    TraceEvent,
    parse_timestamp,
)

from vmdelta_core.plugin import FormatError

QEMU72 = (
    "3794@1795876309.823659:nbd_send_request Sending request to server: { .from = 33177600, .len = 12288, "
    ".handle = 94459863855168, .flags = 0x0, .type = 4 (trim) }"
)
QEMU10 = (
    "4642@1795876366.000042:nbd_send_request Sending request to server: { .from = 4096, .len = 512, "
    ".cookie = 1, .flags = 0x0, .type = 1 (write) }"
)


def test_qemu72_trim_line() -> None:
    assert NbdRequestParser().parse_line(QEMU72) == TraceEvent(1795876309_823659, DISCARD, 33177600, 12288)


def test_qemu10_write_line_keeps_leading_zero_microseconds() -> None:
    assert NbdRequestParser().parse_line(QEMU10) == TraceEvent(1795876366_000042, WRITE, 4096, 512)


@pytest.mark.parametrize(("kind", "op"), [(0, OTHER), (3, OTHER), (6, WRITE), (4, DISCARD), (1, WRITE)])
def test_request_types(kind: int, op: str) -> None:
    line = QEMU72.replace(".type = 4 (trim)", f".type = {kind} (x)")
    event = NbdRequestParser().parse_line(line)
    assert event is not None and event.op == op


def test_foreign_lines_are_not_claimed() -> None:
    assert NbdRequestParser().parse_line("3794@1.2:virtio_blk_req_complete req 0x1 status 0") is None
    assert LegacyDiscardParser().parse_line(QEMU72) is None


def test_damaged_nbd_line_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="not understood"):
        NbdRequestParser().parse_line("3794@1.2:nbd_send_request Sending request to server: { .from = x }")


def test_legacy_discard_reads_unpadded_microseconds_as_integers() -> None:
    # the original log wrote tv_usec unpadded: "5.12" is 12 microseconds after 5 s, which must sort
    # before "5.100" (100 microseconds); a float reading would invert them
    early = LegacyDiscardParser().parse_line("time:5.12, bdrv_discard, sector_num:8, sector_size:16")
    late = LegacyDiscardParser().parse_line("time:5.100, bdrv_discard, sector_num:8, sector_size:16")
    assert early == TraceEvent(5_000_012, DISCARD, 4096, 8192)
    assert late is not None and early.time_us < late.time_us


def test_legacy_write_line() -> None:
    event = LegacyDiscardParser().parse_line("time:7.5, bdrv_write, sector_num:1, sector_size:1")
    assert event == TraceEvent(7_000_005, WRITE, 512, 512)


def test_timestamp_digits() -> None:
    assert parse_timestamp("1", "000001") == 1_000_001
    with pytest.raises(FormatError):
        parse_timestamp("1", "1234567")
