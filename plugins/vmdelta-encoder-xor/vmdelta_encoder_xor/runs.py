"""The zero-run form of an XOR payload, encoded and decoded for a whole batch at once.

A unit's XOR with its base is mostly zeros when few bytes changed. The payload keeps only the
runs that are not::

    u16 n                      number of runs (big-endian, like every field here)
    u16 gap[n]                 zero bytes before each run, counted from the end of the previous one
    u16 size[n]                bytes in each run (at least 1)
    u8  literals[sum(size)]    the XOR bytes of the runs, one run after the other

Headers and literals are kept apart so that the frame codec sees similar bytes together. Zero
gaps of up to ``merge_gap`` bytes are folded into a run rather than opening a new one (a run costs
four header bytes). Everything past the last run is zero. Units are at most 65535 bytes (the
DeltaItem length is a u16), so every field fits.

Both directions work on the concatenation of the batch with numpy index arithmetic: a few dozen
array operations per batch instead of a Python loop per unit or per run, and numpy drops the GIL
inside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RunsError", "decode_runs", "encode_runs"]


class RunsError(ValueError):
    """A run payload is damaged; ``index`` is its position in the batch."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _starts(sizes: np.ndarray) -> np.ndarray:
    """Exclusive prefix sum: where each of a sequence of ``sizes``-long pieces begins."""
    out = np.zeros(sizes.shape[0] + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _put_u16(out: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
    out[positions] = values >> 8
    out[positions + 1] = values & 0xFF


def _get_u16(buf: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return (buf[positions].astype(np.int64) << 8) | buf[positions + 1]


def encode_runs(xor: np.ndarray, lengths: np.ndarray, merge_gap: int) -> list[bytes | None]:
    """Run payloads of the units laid end to end in ``xor``; ``None`` where not smaller.

    :param xor: ``uint8``, the XOR of every unit of the batch, concatenated.
    :param lengths: the length of each unit, in order.
    """
    lengths = lengths.astype(np.int64)
    unit_start = _starts(lengths)
    units = lengths.shape[0]
    nonzero = np.flatnonzero(xor)
    unit = np.searchsorted(unit_start, nonzero, side="right") - 1
    col = nonzero - unit_start[unit]
    # a run opens at the first non-zero byte of a unit and after every gap longer than merge_gap
    opens = np.ones(nonzero.shape[0], dtype=bool)
    opens[1:] = (unit[1:] != unit[:-1]) | (col[1:] - col[:-1] > merge_gap + 1)
    first = np.flatnonzero(opens)
    last = np.append(first[1:] - 1, nonzero.shape[0] - 1) if first.size else first
    run_unit = unit[first]
    run_start, run_end = col[first], col[last] + 1
    run_size = run_end - run_start
    runs_per_unit = np.bincount(run_unit, minlength=units)
    unit_first_run = _starts(runs_per_unit)
    # gap: from the end of the previous run of the same unit (or the unit's start)
    previous_end = np.zeros_like(run_end)
    previous_end[1:] = run_end[:-1]
    previous_end[unit_first_run[:-1][runs_per_unit > 0]] = 0
    run_gap = run_start - previous_end
    literal_bytes = np.bincount(run_unit, weights=run_size, minlength=units).astype(np.int64)
    sizes = 2 + 4 * runs_per_unit + literal_bytes
    out_start = _starts(sizes)
    out = np.empty(int(out_start[-1]), dtype=np.uint8)
    _put_u16(out, out_start[:-1], runs_per_unit)
    index_in_unit = np.arange(run_unit.shape[0]) - unit_first_run[run_unit]
    gap_pos = out_start[run_unit] + 2 + 2 * index_in_unit
    _put_u16(out, gap_pos, run_gap)
    _put_u16(out, gap_pos + 2 * runs_per_unit[run_unit], run_size)
    # literals: byte j of run r goes from xor[unit_start + run_start + j] to after the headers
    literal_start = out_start[:-1] + 2 + 4 * runs_per_unit
    run_literal = _starts(run_size)
    run_literal_in_unit = run_literal[:-1] - run_literal[unit_first_run[run_unit]]
    byte_run = np.repeat(np.arange(run_unit.shape[0]), run_size)
    within = np.arange(byte_run.shape[0]) - run_literal[byte_run]
    out[literal_start[run_unit[byte_run]] + run_literal_in_unit[byte_run] + within] = xor[
        unit_start[run_unit[byte_run]] + run_start[byte_run] + within
    ]
    blob = out.tobytes()
    return [
        blob[out_start[i] : out_start[i + 1]] if sizes[i] < lengths[i] else None
        for i in range(units)
    ]


def decode_runs(payloads: Sequence[bytes], lengths: np.ndarray) -> np.ndarray:
    """The XOR bytes of every unit, concatenated (``sum(lengths)`` bytes).

    :raises RunsError: a payload whose fields do not add up; nothing is read out of bounds.
    """
    lengths = lengths.astype(np.int64)
    units = lengths.shape[0]
    sizes = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=units)
    bad = np.flatnonzero(sizes < 2)
    if bad.size:
        raise RunsError(int(bad[0]), "truncated before its run count")
    buf = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    pay_start = _starts(sizes)
    runs = _get_u16(buf, pay_start[:-1])
    literal_bytes = sizes - 2 - 4 * runs
    bad = np.flatnonzero(literal_bytes < 0)
    if bad.size:
        raise RunsError(int(bad[0]), f"{int(runs[bad[0]])} run headers do not fit in {int(sizes[bad[0]])} bytes")
    unit_first_run = _starts(runs)
    run_unit = np.repeat(np.arange(units), runs)
    index_in_unit = np.arange(run_unit.shape[0]) - unit_first_run[run_unit]
    gap_pos = pay_start[run_unit] + 2 + 2 * index_in_unit
    run_gap = _get_u16(buf, gap_pos)
    run_size = _get_u16(buf, gap_pos + 2 * runs[run_unit])
    bad = np.flatnonzero(run_size == 0)
    if bad.size:
        raise RunsError(int(run_unit[bad[0]]), "a run of zero bytes")
    # run ends inside their unit: a prefix sum of gap + size, restarted at each unit
    step = _starts(run_gap + run_size)
    run_end = step[1:] - step[unit_first_run[run_unit]]
    covered = np.bincount(run_unit, weights=run_size, minlength=units).astype(np.int64)
    unit_end = np.zeros(units, dtype=np.int64)
    has_runs = runs > 0
    unit_end[has_runs] = run_end[unit_first_run[1:][has_runs] - 1]
    bad = np.flatnonzero((covered != literal_bytes) | (unit_end > lengths))
    if bad.size:
        i = int(bad[0])
        raise RunsError(i, f"runs cover {int(unit_end[i])} of {int(lengths[i])} bytes with "
                           f"{int(covered[i])} literal bytes, the payload holds {int(literal_bytes[i])}")
    unit_start = _starts(lengths)
    xor = np.zeros(int(unit_start[-1]), dtype=np.uint8)
    run_literal = _starts(run_size)
    byte_run = np.repeat(np.arange(run_unit.shape[0]), run_size)
    within = np.arange(byte_run.shape[0]) - run_literal[byte_run]
    literal_start = pay_start[:-1] + 2 + 4 * runs
    run_literal_in_unit = run_literal[:-1] - run_literal[unit_first_run[run_unit]]
    run_start = run_end - run_size
    xor[unit_start[run_unit[byte_run]] + run_start[byte_run] + within] = buf[
        literal_start[run_unit[byte_run]] + run_literal_in_unit[byte_run] + within
    ]
    return xor
