from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_encoder_xor import XorEncoder

from vmdelta_core.plugin import ConfigError, FormatError, Ref
from vmdelta_core.testing import check_encoder, default_registry, sample_unit_pairs


def _views(pairs):
    return [memoryview(b) for b, _ in pairs], [memoryview(t) for _, t in pairs]


def test_conformance_on_sample_pairs() -> None:
    counts = check_encoder(XorEncoder())
    # equal units and sparse edits shrink; shifted text, zeros<->text and noise do not
    assert counts == {"accepted": 3, "declined": 5}


def test_plain_mode_keeps_every_unit() -> None:
    counts = check_encoder(XorEncoder(mode="plain"))
    assert counts == {"accepted": 8, "declined": 0}


def test_plain_and_runs_payloads_decode_in_one_batch() -> None:
    base, target = sample_unit_pairs()[1]
    (runs,) = XorEncoder().encode([memoryview(base)], [memoryview(target)])
    (plain,) = XorEncoder(mode="plain").encode([memoryview(base)], [memoryview(target)])
    assert runs is not None and len(runs) < len(target) == len(plain)
    out = XorEncoder().decode([memoryview(base)] * 2, [memoryview(runs), memoryview(plain)], [len(target)] * 2)
    assert out == [target, target]


@settings(max_examples=60, deadline=None)
@given(
    base=st.binary(min_size=1, max_size=4096),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=64)), max_size=8),
    random_target=st.booleans(),
    other=st.binary(min_size=1, max_size=4096),
    merge_gap=st.integers(0, 15),
)
def test_round_trips_random_pairs(base: bytes, edits, random_target: bool, other: bytes, merge_gap: int) -> None:
    target = bytearray(other if random_target else base)
    for pos, data in edits:
        pos = min(pos, len(target))
        target[pos : pos + len(data)] = data
    check_encoder(XorEncoder(merge_gap=merge_gap), [(base, bytes(target)), (base[: len(target) // 2], bytes(target))])


@pytest.mark.fixtures
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_round_trips_real_units(real_pairs, kind: str) -> None:
    counts = check_encoder(XorEncoder(), real_pairs[kind])
    assert counts["accepted"] > 0
    assert check_encoder(XorEncoder(mode="plain"), real_pairs[kind])["declined"] == 0


def test_a_batch_error_names_the_unit() -> None:
    with pytest.raises(FormatError, match="payload 1 of the batch"):
        XorEncoder().decode([memoryview(bytes(64))] * 2, [memoryview(b"\x00\x00"), memoryview(b"\x00\x09")], [64, 64])
    with pytest.raises(FormatError, match="65 bytes for a 64-byte unit"):
        XorEncoder().decode([memoryview(bytes(64))], [memoryview(bytes(65))], [64])


def test_empty_batches() -> None:
    assert XorEncoder().encode([], []) == [] and XorEncoder().decode([], [], []) == []


def test_unit_too_long_for_the_wire() -> None:
    with pytest.raises(ConfigError):
        XorEncoder().encode([memoryview(bytes(70000))], [memoryview(bytes(70000))])


def test_registered_under_its_classic_ref() -> None:
    encoder = default_registry().encoder("xor")
    assert isinstance(encoder, XorEncoder)
    assert encoder.wire_ref == Ref.XOR == 0x9


@pytest.mark.parametrize(
    "options", [{"mode": "rle"}, {"merge_gap": -1}, {"merge_gap": 16}, {"merge_gap": True}, {"level": 3}]
)
def test_bad_options_are_config_errors(options) -> None:
    with pytest.raises(ConfigError):
        XorEncoder().configure(options)


def test_configure() -> None:
    configured = XorEncoder().configure({"mode": "plain", "merge_gap": 8})
    assert (configured.mode, configured.merge_gap) == ("plain", 8)
