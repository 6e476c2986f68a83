from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_encoder_zstd import ZstdEncoder, window_log

from vmdelta_core.plugin import ConfigError, FormatError
from vmdelta_core.testing import check_encoder, default_registry, sample_unit_pairs, unit_pairs

BASE, TARGET = sample_unit_pairs()[1]


def _views(pairs):
    return [memoryview(b) for b, _ in pairs], [memoryview(t) for _, t in pairs]


def _decode(payload: bytes, length: int = len(TARGET)) -> list[bytes]:
    return ZstdEncoder().decode([memoryview(BASE[:length].ljust(length, b"\0"))], [memoryview(payload)], [length])


@pytest.mark.parametrize("level", [-5, 1, 3, 19])
def test_conformance_on_sample_pairs(level: int) -> None:
    counts = check_encoder(ZstdEncoder(level=level))
    assert counts["declined"] >= 1 and counts["accepted"] >= 6


def test_declines_what_would_not_shrink() -> None:
    pairs = sample_unit_pairs()
    payloads = ZstdEncoder().encode(*_views(pairs))
    for (_, target), payload in zip(pairs, payloads, strict=True):
        assert payload is None or len(payload) < len(target)
    assert payloads[5] is None  # noise against other noise


def test_declines_units_with_an_all_zero_base() -> None:
    assert ZstdEncoder().encode([memoryview(bytes(len(TARGET)))], [memoryview(TARGET)]) == [None]


def test_the_base_is_used_as_dictionary() -> None:
    (with_base,) = ZstdEncoder().encode([memoryview(BASE)], [memoryview(TARGET)])
    unrelated = bytes(range(256)) * (len(BASE) // 256)
    (without,) = ZstdEncoder().encode([memoryview(unrelated)], [memoryview(TARGET)])
    assert with_base is not None and without is not None and len(with_base) < len(without) // 2


@settings(max_examples=60, deadline=None)
@given(pair=unit_pairs())
def test_round_trips_random_pairs(pair: tuple[bytes, bytes]) -> None:
    check_encoder(ZstdEncoder(), [pair])


@pytest.mark.fixtures
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_round_trips_real_units(real_pairs, kind: str) -> None:
    counts = check_encoder(ZstdEncoder(), real_pairs[kind])
    assert counts["accepted"] > 0


def test_largest_unit_round_trips() -> None:
    base = bytes(range(256)) * 256
    target = base[:65535][::-1]
    check_encoder(ZstdEncoder(level=19), [(base[:65535], target)])


def test_a_frame_asking_for_a_large_window_is_refused() -> None:
    # magicless frame header: descriptor 0x00 (no content size, window descriptor follows),
    # window descriptor 0x88 = 2**27 bytes, then a raw last block of 3 bytes
    hostile = b"\x00\x88" + b"\x19\x00\x00" + b"abc"
    with pytest.raises(FormatError, match="too much memory"):
        _decode(hostile)
    assert window_log(4096) == 13 and window_log(1) == 10


def test_a_frame_declaring_a_content_size_is_refused() -> None:
    # descriptor 0xC0: an 8-byte content size follows; python-zstandard would allocate it
    hostile = b"\xc0" + (1 << 40).to_bytes(8, "little") + b"\x00" + b"\x19\x00\x00" + b"abc"
    with pytest.raises(FormatError, match="declares a size"):
        _decode(hostile)


@pytest.mark.parametrize("cut", [0, 1, 3, -1])
def test_truncated_payloads_are_refused(cut: int) -> None:
    (payload,) = ZstdEncoder().encode([memoryview(BASE)], [memoryview(TARGET)])
    with pytest.raises(FormatError):
        _decode(payload[:cut])


def test_trailing_bytes_are_refused() -> None:
    (payload,) = ZstdEncoder().encode([memoryview(BASE)], [memoryview(TARGET)])
    with pytest.raises(FormatError):
        _decode(payload + b"\x00\x00\x00")


def test_a_payload_for_a_shorter_unit_is_refused() -> None:
    (payload,) = ZstdEncoder().encode([memoryview(BASE)], [memoryview(TARGET)])
    with pytest.raises(FormatError):
        _decode(payload, len(TARGET) + 100)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_damage_never_escapes(data) -> None:
    (payload,) = ZstdEncoder().encode([memoryview(BASE)], [memoryview(TARGET)])
    damaged = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 6))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = _decode(bytes(damaged[: data.draw(st.integers(0, len(damaged)))]))
    except FormatError:
        return
    assert len(out[0]) == len(TARGET)


def test_threads_give_the_same_payloads() -> None:
    pairs = sample_unit_pairs() * 8
    encoder = ZstdEncoder()
    alone = encoder.encode(*_views(pairs))
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda part: encoder.encode(*_views(part)), [pairs[::2], pairs[1::2]]))
    assert halves[0] == alone[::2] and halves[1] == alone[1::2]


def test_registered_with_a_free_ref() -> None:
    encoder = default_registry().encoder("zstd")
    assert isinstance(encoder, ZstdEncoder) and encoder.wire_ref is None


@pytest.mark.parametrize("options", [{"level": 23}, {"level": 2.5}, {"dict": "x"}])
def test_bad_options_are_config_errors(options) -> None:
    with pytest.raises(ConfigError):
        ZstdEncoder().configure(options)


def test_configure_sets_the_level() -> None:
    assert ZstdEncoder().configure({"level": 19}).level == 19
