from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_filter_trim import ByteRanges

from vmdelta_core.plugin import units_covered

SIZE = 256

ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, SIZE), st.integers(0, SIZE)).map(
        lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2]))
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_ranges_match_a_bitmap_model(events: list[tuple[bool, int, int]]) -> None:
    model = np.zeros(SIZE, dtype=bool)
    ranges = ByteRanges()
    for add, start, end in events:
        model[start:end] = add
        (ranges.add if add else ranges.remove)(start, end)
    got = np.zeros(SIZE, dtype=bool)
    for start, end in zip(ranges.starts, ranges.ends, strict=True):
        assert start < end
        got[start:end] = True
    assert np.array_equal(got, model)
    # merged: no two ranges touch
    assert all(e < s for e, s in zip(ranges.ends, ranges.starts[1:], strict=False))
    assert ranges.total() == int(model.sum())
    # a unit is covered exactly when all its bytes are in the model
    unit = 16
    units = np.arange(SIZE // unit + 1, dtype=np.int64)
    mask = units_covered(*ranges.arrays(), units, unit, SIZE)
    expected = [bool(model[u * unit : (u + 1) * unit].all()) and u * unit < SIZE for u in units]
    assert mask.tolist() == expected
