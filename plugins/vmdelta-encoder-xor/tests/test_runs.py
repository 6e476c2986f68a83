"""The batch run codec against a plain one-unit-at-a-time reference of the same format."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_encoder_xor.runs import RunsError, decode_runs, encode_runs


def reference_encode(xor: bytes, merge_gap: int) -> bytes | None:
    runs: list[list[int]] = []  # [start, end)
    for pos, byte in enumerate(xor):
        if not byte:
            continue
        if runs and pos - runs[-1][1] <= merge_gap:
            runs[-1][1] = pos + 1
        else:
            runs.append([pos, pos + 1])
    gaps, sizes, previous = [], [], 0
    for start, end in runs:
        gaps.append(start - previous)
        sizes.append(end - start)
        previous = end
    payload = struct.pack(f">H{len(runs)}H{len(runs)}H", len(runs), *gaps, *sizes)
    payload += b"".join(xor[start:end] for start, end in runs)
    too_dense = 2 + 4 * len(runs) + sum(1 for b in xor if b) >= len(xor) - len(xor) // 32
    return None if too_dense or len(payload) >= len(xor) else payload


sparse_unit = st.builds(
    lambda n, edits: bytes(
        np.bincount([p % max(n, 1) for p, _ in edits], weights=[v for _, v in edits], minlength=n).astype(np.uint8)
        if n
        else b""
    ),
    st.integers(0, 600),
    st.lists(st.tuples(st.integers(0, 599), st.integers(1, 255)), max_size=60),
)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 600),
    st.lists(st.one_of(sparse_unit, st.binary(max_size=600)), min_size=1, max_size=12),
    st.integers(0, 9),
)
def test_matches_reference_and_round_trips(length: int, units: list[bytes], merge_gap: int) -> None:
    units = [u[:length].ljust(length, b"\0") for u in units]
    lengths = np.array([len(u) for u in units], dtype=np.int64)
    xor = np.frombuffer(b"".join(units), dtype=np.uint8).reshape(len(units), length)
    payloads = encode_runs(xor, merge_gap)
    assert payloads == [reference_encode(u, merge_gap) for u in units]
    kept = [i for i, p in enumerate(payloads) if p is not None]
    if kept:
        flat = decode_runs([payloads[i] for i in kept], lengths[kept])
        assert flat.tobytes() == b"".join(units[i] for i in kept)


def test_an_unchanged_unit_is_two_bytes() -> None:
    assert encode_runs(np.zeros((1, 4096), dtype=np.uint8), 4) == [b"\x00\x00"]


def test_gaps_up_to_merge_gap_stay_in_one_run() -> None:
    unit = bytearray(64)
    unit[10] = unit[15] = 1  # a gap of four zeros
    (merged,) = encode_runs(np.frombuffer(bytes(unit), np.uint8).reshape(1, 64), 4)
    (split,) = encode_runs(np.frombuffer(bytes(unit), np.uint8).reshape(1, 64), 3)
    assert merged == struct.pack(">HHH", 1, 10, 6) + bytes(unit[10:16])
    assert split == struct.pack(">HHHHH", 2, 10, 4, 1, 1) + b"\x01\x01"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00", "truncated"),
        (b"\x00\x05\x00\x00", "do not fit"),
        (struct.pack(">HHH", 1, 0, 0), "zero bytes"),
        (struct.pack(">HHH", 1, 0, 3) + b"ab", "literal bytes"),
        (struct.pack(">HHH", 1, 0, 2) + b"abc", "literal bytes"),
        (struct.pack(">HHH", 1, 60, 5) + b"abcde", "cover 65 of 64"),
        (struct.pack(">HHHHH", 2, 0xFFFF, 1, 0xFFFF, 1) + b"ab", "cover"),
    ],
)
def test_damaged_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(RunsError, match=message) as info:
        decode_runs([b"\x00\x00", payload], np.array([64, 64]))
    assert info.value.index == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=5), st.lists(st.integers(1, 64), min_size=5, max_size=5))
def test_arbitrary_bytes_never_escape(payloads: list[bytes], lengths: list[int]) -> None:
    lengths_array = np.array(lengths[: len(payloads)], dtype=np.int64)
    try:
        flat = decode_runs(payloads, lengths_array)
    except RunsError as exc:
        assert 0 <= exc.index < len(payloads)
        return
    assert flat.shape == (int(lengths_array.sum()),)
