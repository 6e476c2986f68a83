"""Span arithmetic against a brute-force model."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from vmdelta_source_disk.extents import intersect, normalize, subtract, to_extents, to_spans, union, unit_spans

spans = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1])), max_size=8)


def _bytes(s: np.ndarray) -> set[int]:
    return {b for start, end in np.asarray(s).reshape(-1, 2).tolist() for b in range(start, end)}


def _arr(s: list[tuple[int, int]]) -> np.ndarray:
    return np.array(s, dtype=np.int64).reshape(-1, 2)


def _is_normal(s: np.ndarray) -> bool:
    return bool(np.all(s[:, 1] > s[:, 0]) and np.all(s[1:, 0] > s[:-1, 1]))


@given(a=spans, b=spans)
def test_set_operations(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    sa, sb = _bytes(_arr(a)), _bytes(_arr(b))
    for result, expected in (
        (normalize(_arr(a)), sa),
        (union(_arr(a), _arr(b)), sa | sb),
        (subtract(_arr(a), _arr(b)), sa - sb),
        (intersect(_arr(a), _arr(b)), sa & sb),
    ):
        assert _is_normal(result) and _bytes(result) == expected


@given(starts=st.lists(st.integers(0, 100), max_size=10), length=st.integers(1, 20), unit=st.integers(1, 9))
def test_unit_spans(starts: list[int], length: int, unit: int) -> None:
    limit = 90
    expected = sorted({b // unit for s in starts for b in range(s, min(s + length, limit))})
    assert unit_spans(np.array(starts, dtype=np.int64), length, unit, limit).tolist() == expected


def test_extent_conversions() -> None:
    ext = np.array([[0, 5], [10, 1]], dtype=np.int64)
    assert to_spans(ext).tolist() == [[0, 5], [10, 11]]
    assert np.array_equal(to_extents(to_spans(ext)), ext)
