"""Damaged and hostile VCDIFF payloads: refused before xdelta3 sees them, never a crash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_encoder_xdelta3 import Xdelta3Encoder, check_payload
from vmdelta_encoder_xdelta3.c_vcdiff import VCDIFF_MAGIC, VcdiffError

from vmdelta_core.plugin import FormatError
from vmdelta_core.testing import sample_unit_pairs

BASE, TARGET = sample_unit_pairs()[1]


def _payload() -> bytes:
    (payload,) = Xdelta3Encoder().encode([memoryview(BASE)], [memoryview(TARGET)])
    assert payload is not None
    return payload


def _varint(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _window(
    target_length: int, sections: bytes = b"\x00\x00\x00", indicator: int = 0, delta_indicator: int = 0
) -> bytes:
    body = _varint(target_length) + bytes([delta_indicator]) + sections
    return bytes([indicator]) + _varint(len(body)) + body


def test_own_payload_passes() -> None:
    check_payload(_payload(), len(BASE), len(TARGET))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "no VCDIFF header"),
        (VCDIFF_MAGIC, "truncated VCDIFF header"),
        (VCDIFF_MAGIC + b"\x01", "secondary"),
        (VCDIFF_MAGIC + b"\x02", "code tables"),
        (VCDIFF_MAGIC + b"\x04\x85", "truncated integer"),
        (VCDIFF_MAGIC + b"\x04\x7f", "application header runs past"),
        # a window claiming 64 MiB: xdelta3 would allocate that much before noticing
        (VCDIFF_MAGIC + b"\x00" + _window(1 << 26), "more than the 4096-byte unit"),
        (VCDIFF_MAGIC + b"\x00" + _window(4096, delta_indicator=1), "secondary compression"),
        (VCDIFF_MAGIC + b"\x00" + _window(4096, sections=b"\x05\x00\x00"), "do not add up"),
        (VCDIFF_MAGIC + b"\x00" + _window(100), "rebuild 100 bytes"),
        (VCDIFF_MAGIC + b"\x00\x03", "window indicator"),
        (VCDIFF_MAGIC + b"\x00\x01\xa0\x00\xa0\x00", "beyond the 4096-byte base"),
        (VCDIFF_MAGIC + b"\x00\x02\x10\x00", "not yet produced"),
        (VCDIFF_MAGIC + b"\x00\x00\xff\xff\xff\xff\xff\x7f", "longer than 5 bytes"),
    ],
)
def test_hostile_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(VcdiffError, match=message):
        check_payload(payload, 4096, 4096)
    with pytest.raises(FormatError, match="xdelta3 payload"):
        Xdelta3Encoder().decode([memoryview(bytes(4096))], [memoryview(payload)], [4096])


def test_damaged_sections_are_format_errors() -> None:
    payload = bytearray(_payload())
    # keep the headers intact, point the instructions somewhere impossible
    for i in range(len(payload) - 4, len(payload)):
        payload[i] = 0xFF
    try:
        out = Xdelta3Encoder().decode([memoryview(BASE)], [memoryview(bytes(payload))], [len(TARGET)])
    except FormatError:
        return
    assert len(out[0]) == len(TARGET)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_damage_never_escapes(data) -> None:
    payload = bytearray(_payload())
    for _ in range(data.draw(st.integers(1, 6))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        out = Xdelta3Encoder().decode([memoryview(BASE)], [memoryview(bytes(payload[:cut]))], [len(TARGET)])
    except FormatError:
        return
    assert len(out[0]) == len(TARGET)
