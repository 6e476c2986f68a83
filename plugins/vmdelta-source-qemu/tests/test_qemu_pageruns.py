"""Page runs agree with the masks they stand for."""

from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_source_qemu import pageruns
from vmdelta_source_qemu.pageruns import (
    bitmap_runs,
    intersect,
    merge,
    pack_runs,
    page_runs,
    runs_of,
    subtract,
    uncovered,
)

masks = st.lists(st.booleans(), max_size=200).map(lambda bits: np.array(bits, bool))


def mask_of(runs: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, bool)
    for start, stop in runs.tolist():
        out[start:stop] = True
    return out


def canonical(runs: np.ndarray) -> bool:
    return bool((runs[:, 1] > runs[:, 0]).all() and (runs[1:, 0] > runs[:-1, 1]).all())


@settings(max_examples=200, deadline=None)
@given(a=masks, b=masks)
def test_set_operations_match_masks(a: np.ndarray, b: np.ndarray) -> None:
    n = max(a.shape[0], b.shape[0])
    a, b = np.pad(a, (0, n - a.shape[0])), np.pad(b, (0, n - b.shape[0]))
    ra, rb = page_runs(a), page_runs(b)
    assert np.array_equal(mask_of(ra, n), a) and canonical(ra)
    assert np.array_equal(runs_of(np.flatnonzero(a)), ra)
    for got, want in ((intersect(ra, rb), a & b), (subtract(ra, rb), a & ~b), (uncovered(ra, 0, n), ~a)):
        assert canonical(got)
        assert np.array_equal(mask_of(got, n), want)
    both = merge(np.concatenate((ra, rb)))
    assert canonical(both) and np.array_equal(mask_of(both, n), a | b)


@settings(max_examples=200, deadline=None)
@given(mask=masks, extra=st.integers(0, 7))
def test_pack_runs_is_packbits(mask: np.ndarray, extra: int) -> None:
    n = mask.shape[0] + extra
    mask = np.pad(mask, (0, extra))
    expected = np.packbits(mask, bitorder="little").tobytes() if mask.any() else b""
    assert pack_runs(page_runs(mask), n) == expected


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=8, max_size=64).map(lambda b: b[: len(b) // 8 * 8]),
    cut=st.integers(0, 63),
    step=st.sampled_from([8, 16, 1 << 16]),
)
def test_bitmap_runs_read_lsb_first(data: bytes, cut: int, step: int) -> None:
    """Read in pieces of ``step`` bytes, runs across pieces joined."""
    bitmap = np.frombuffer(data, np.uint8)
    bits = np.unpackbits(bitmap, bitorder="little").astype(bool)
    npages = max(0, bits.shape[0] - cut)
    with mock.patch.object(pageruns, "_BITMAP_STEP", step):
        runs, clear = bitmap_runs(bitmap, npages)
    assert canonical(runs)
    assert np.array_equal(mask_of(runs, npages), bits[:npages])
    assert clear == (not bits[npages:].any())
