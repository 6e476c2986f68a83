"""units_covered, the one implementation the filters share, against a byte-bitmap model."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vmdelta_core.units import units_covered

UNIT = 16


def merged(model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.flatnonzero(np.diff(np.concatenate(([False], model, [False])).astype(np.int8)))
    return edges[0::2].astype(np.int64), edges[1::2].astype(np.int64)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=200), st.lists(st.integers(0, 15), max_size=30))
def test_a_unit_is_covered_exactly_when_all_its_bytes_are(bits: list[bool], picked: list[int]) -> None:
    model = np.array(bits, dtype=bool)
    size = model.size
    units = np.array(picked, dtype=np.int64)
    mask = units_covered(*merged(model), units, UNIT, size)
    expected = [u * UNIT < size and bool(model[u * UNIT : (u + 1) * UNIT].all()) for u in picked]
    assert mask.dtype == np.bool_ and mask.shape == units.shape
    assert mask.tolist() == expected


def test_the_short_last_unit_is_judged_on_its_bytes() -> None:
    starts, ends = np.array([48]), np.array([50])
    assert units_covered(starts, ends, np.array([2, 3, 4]), UNIT, 50).tolist() == [False, True, False]


def test_no_ranges_or_no_units() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert units_covered(empty, empty, np.array([0, 1]), UNIT, 64).tolist() == [False, False]
    assert units_covered(np.array([0]), np.array([64]), empty, UNIT, 64).shape == (0,)


def test_lists_are_accepted_as_well_as_arrays() -> None:
    assert units_covered([0], [32], [0, 1, 2], UNIT, 64).tolist() == [True, True, False]
