"""Damaged and hostile BSDIFF40 payloads: refused with a FormatError and a bounded allocation."""

from __future__ import annotations

import bz2
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_encoder_bsdiff import BsdiffEncoder
from vmdelta_encoder_bsdiff.c_bsdiff40 import HEADER, pack_header, unpack_header

from vmdelta_core.plugin import FormatError
from vmdelta_core.testing import sample_unit_pairs

BASE, TARGET = sample_unit_pairs()[1]
EMPTY = bz2.compress(b"")


def _payload() -> bytes:
    (payload,) = BsdiffEncoder().encode([memoryview(BASE)], [memoryview(TARGET)])
    assert payload is not None
    return payload


def _decode(payload: bytes, length: int = len(TARGET)) -> list[bytes]:
    return BsdiffEncoder().decode([memoryview(BASE[:length].ljust(length, b"\0"))], [memoryview(payload)], [length])


def test_struct_path_matches_the_schema() -> None:
    payload = _payload()
    parsed = HEADER.parse(payload)
    assert unpack_header(payload) == (parsed.control_length, parsed.diff_length, parsed.new_length)
    assert HEADER.build(parsed) == payload[:32] == pack_header(*unpack_header(payload))


def _patch(control: bytes, diff: bytes, extra: bytes, new_length: int = len(TARGET)) -> bytes:
    return pack_header(len(control), len(diff), new_length) + control + diff + extra


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (b"BSDIFF39" + bytes(24), "magic"),
        # a header claiming a 2**62-byte unit: refused before anything is allocated
        (pack_header(14, 14, 1 << 62) + EMPTY * 3, "not the 4096-byte unit"),
        (b"BSDIFF40" + struct.pack("<QQQ", 1 << 63 | 14, 14, 4096) + EMPTY * 3, "negative"),
        (pack_header(1 << 40, 14, 4096) + EMPTY * 3, "past the end"),
        # a control block that inflates to 10 MB from a few dozen bytes
        (_patch(bz2.compress(bytes(10_000_000)), EMPTY, EMPTY), "control block holds more than"),
        # more (add, copy, seek) triples than a 4 KiB unit can need
        (_patch(bz2.compress(bytes(24 * 600)), EMPTY, EMPTY), "control block holds more than"),
        (_patch(EMPTY, bz2.compress(bytes(4097)), EMPTY), "diff block holds more than 4096"),
        (_patch(EMPTY, EMPTY, EMPTY[:-3]), "extra block is truncated"),
        (_patch(EMPTY, EMPTY, EMPTY + b"x"), "stray bytes"),
        (_patch(b"garbage!!!!!!!", EMPTY, EMPTY), "control block does not decompress"),
        (_patch(EMPTY, EMPTY, EMPTY), "corrupt patch"),
    ],
)
def test_hostile_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        _decode(payload, 4096)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_damage_never_escapes(data) -> None:
    payload = bytearray(_payload())
    for _ in range(data.draw(st.integers(1, 6))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        out = _decode(bytes(payload[:cut]))
    except FormatError:
        return
    assert len(out[0]) == len(TARGET)
