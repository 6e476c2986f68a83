from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import bsdiff4
import pytest
from hypothesis import given, settings
from vmdelta_encoder_bsdiff import BsdiffEncoder

from vmdelta_core.plugin import Ref
from vmdelta_core.testing import check_encoder, default_registry, sample_unit_pairs, unit_pairs


def _views(pairs):
    return [memoryview(b) for b, _ in pairs], [memoryview(t) for _, t in pairs]


def test_conformance_on_sample_pairs() -> None:
    counts = check_encoder(BsdiffEncoder())
    assert counts["declined"] >= 1 and counts["accepted"] >= 5


def test_declines_units_with_an_all_zero_base() -> None:
    base, target = sample_unit_pairs()[1]
    assert BsdiffEncoder().encode([memoryview(bytes(len(base)))], [memoryview(target)]) == [None]
    assert BsdiffEncoder().encode([memoryview(base)], [memoryview(target)]) != [None]


def test_declines_what_would_not_shrink() -> None:
    pairs = sample_unit_pairs()
    payloads = BsdiffEncoder().encode(*_views(pairs))
    for (_, target), payload in zip(pairs, payloads, strict=True):
        assert payload is None or len(payload) < len(target)
    assert payloads[5] is None  # noise against other noise


@settings(max_examples=40, deadline=None)
@given(pair=unit_pairs())
def test_round_trips_random_pairs(pair: tuple[bytes, bytes]) -> None:
    check_encoder(BsdiffEncoder(), [pair])


@pytest.mark.fixtures
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_round_trips_real_units(real_pairs, kind: str) -> None:
    counts = check_encoder(BsdiffEncoder(), real_pairs[kind][:120])
    assert counts["accepted"] > 0


def test_payloads_are_standard_bsdiff40() -> None:
    """bsdiff4's own patch() applies our payloads, and we apply bsdiff4's own diff()."""
    pairs = sample_unit_pairs()
    for base, target in [pairs[i] for i in (0, 1, 2, 4)]:
        (payload,) = BsdiffEncoder().encode([memoryview(base)], [memoryview(target)])
        assert payload is not None and payload.startswith(b"BSDIFF40")
        assert bsdiff4.patch(base, payload) == target
        theirs = bsdiff4.diff(base, target)
        assert BsdiffEncoder().decode([memoryview(base)], [memoryview(theirs)], [len(target)]) == [target]


def test_threads_give_the_same_payloads() -> None:
    pairs = sample_unit_pairs() * 4
    encoder = BsdiffEncoder()
    alone = encoder.encode(*_views(pairs))
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda part: encoder.encode(*_views(part)), [pairs[::2], pairs[1::2]]))
    assert halves[0] == alone[::2] and halves[1] == alone[1::2]


def test_registered_under_its_classic_ref() -> None:
    encoder = default_registry().encoder("bsdiff")
    assert isinstance(encoder, BsdiffEncoder)
    assert encoder.wire_ref == Ref.BSDIFF == 0x7
