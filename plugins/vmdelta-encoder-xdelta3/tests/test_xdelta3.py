from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from vmdelta_encoder_xdelta3 import Xdelta3Encoder
from vmdelta_encoder_xdelta3._library import load_library

from vmdelta_core.plugin import ConfigError, FormatError, Ref
from vmdelta_core.testing import check_encoder, default_registry, sample_unit_pairs, unit_pairs


def _views(pairs):
    return [memoryview(b) for b, _ in pairs], [memoryview(t) for _, t in pairs]


@pytest.mark.parametrize("level", [0, 1, 9])
def test_conformance_on_sample_pairs(level: int) -> None:
    counts = check_encoder(Xdelta3Encoder(level=level))
    # random data against random data cannot shrink; text edits always do
    assert counts["declined"] >= 1 and counts["accepted"] >= 5


def test_declines_units_with_an_all_zero_base() -> None:
    base, target = sample_unit_pairs()[1]
    assert Xdelta3Encoder().encode([memoryview(bytes(len(base)))], [memoryview(target)]) == [None]
    assert Xdelta3Encoder().encode([memoryview(base)], [memoryview(target)]) != [None]


def test_declines_what_would_not_shrink() -> None:
    pairs = sample_unit_pairs()
    payloads = Xdelta3Encoder().encode(*_views(pairs))
    for (_, target), payload in zip(pairs, payloads, strict=True):
        assert payload is None or len(payload) < len(target)
    assert payloads[5] is None  # noise against other noise


@settings(max_examples=60, deadline=None)
@given(pair=unit_pairs())
def test_round_trips_random_pairs(pair: tuple[bytes, bytes]) -> None:
    check_encoder(Xdelta3Encoder(), [pair])


@pytest.mark.fixtures
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_round_trips_real_units(real_pairs, kind: str) -> None:
    counts = check_encoder(Xdelta3Encoder(), real_pairs[kind])
    assert counts["accepted"] > 0
    assert counts["accepted"] + counts["declined"] == len(real_pairs[kind])


@pytest.mark.skipif(shutil.which("xdelta3") is None, reason="the xdelta3 command is not installed")
def test_payload_decodes_with_the_xdelta3_command(tmp_path: Path) -> None:
    base, target = sample_unit_pairs()[1]
    (payload,) = Xdelta3Encoder(level=9).encode([memoryview(base)], [memoryview(target)])
    assert payload is not None
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "payload").write_bytes(payload)
    subprocess.run(
        ["xdelta3", "-d", "-f", "-s", str(tmp_path / "base"), str(tmp_path / "payload"), str(tmp_path / "out")],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "out").read_bytes() == target


@pytest.mark.skipif(shutil.which("xdelta3") is None, reason="the xdelta3 command is not installed")
def test_decodes_a_payload_of_the_xdelta3_command(tmp_path: Path) -> None:
    base, target = sample_unit_pairs()[2]
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "target").write_bytes(target)
    # -S none: no secondary compression, -A: no application header; what the encoder accepts
    subprocess.run(
        [
            "xdelta3",
            "-e",
            "-9",
            "-S",
            "none",
            "-A",
            "-f",
            "-s",
            str(tmp_path / "base"),
            str(tmp_path / "target"),
            str(tmp_path / "payload"),
        ],
        check=True,
        capture_output=True,
    )
    payload = (tmp_path / "payload").read_bytes()
    assert Xdelta3Encoder().decode([memoryview(base)], [memoryview(payload)], [len(target)]) == [target]


def test_threads_give_the_same_payloads() -> None:
    pairs = sample_unit_pairs() * 8
    encoder = Xdelta3Encoder()
    alone = encoder.encode(*_views(pairs))
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda part: encoder.encode(*_views(part)), [pairs[::2], pairs[1::2]]))
    assert halves[0] == alone[::2] and halves[1] == alone[1::2]


def test_library_reports_its_size_type() -> None:
    assert load_library().usize in (4, 8)


def test_registered_under_its_classic_ref() -> None:
    encoder = default_registry().encoder("xdelta3")
    assert isinstance(encoder, Xdelta3Encoder)
    assert encoder.wire_ref == Ref.XDELTA == 0x2


@pytest.mark.parametrize("options", [{"level": 10}, {"level": "9"}, {"speed": 1}])
def test_bad_options_are_config_errors(options) -> None:
    with pytest.raises(ConfigError):
        Xdelta3Encoder().configure(options)


def test_configure_sets_the_level() -> None:
    assert Xdelta3Encoder().configure({"level": 0}).level == 0


def test_a_payload_for_another_length_is_refused() -> None:
    base, target = sample_unit_pairs()[1]
    (payload,) = Xdelta3Encoder().encode([memoryview(base)], [memoryview(target)])
    with pytest.raises(FormatError):
        Xdelta3Encoder().decode([memoryview(base)], [memoryview(payload)], [len(target) - 1])
