"""The zero-run form of an XOR payload, encoded and decoded for a whole batch at once.

A unit's XOR with its base is mostly zeros when few bytes changed. The payload keeps only the
runs that are not::

    u16 n                      number of runs (big-endian, like every field here)
    u16 gap[n]                 zero bytes before each run, counted from the end of the previous one
    u16 size[n]                bytes in each run (at least 1)
    u8  literals[sum(size)]    the XOR bytes of the runs, one run after the other

Headers and literals are kept apart so that the frame codec sees similar bytes together. Zero
gaps of up to ``merge_gap`` bytes are folded into a run rather than opening a new one (a run costs
four header bytes). Everything past the last run is zero. A unit whose XOR is too dense for runs
to save at least 1/32 of it is declined. Units are at most 65535 bytes (the DeltaItem length is a
u16), so every field fits.

Both directions work on whole batches with numpy: run boundaries come from shifted copies of the
non-zero mask, literals are gathered and scattered with one mask of the bytes inside runs, so the
cost is a few dozen array operations per batch rather than Python work per unit or per run, and
numpy drops the GIL inside them.
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


def _inside(size: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A mask of the bytes inside the runs [starts, ends), with a +1/-1 marker prefix sum.

    Starts are distinct and so are ends, but an end may meet the next unit's first start,
    hence two marker arrays.
    """
    opened = np.zeros(size, dtype=np.int8)
    closed = np.zeros(size + 1, dtype=np.int8)
    opened[starts] = 1
    closed[ends] = 1
    return np.cumsum(opened - closed[:-1], dtype=np.int8).view(bool)


def _get_u16(buf: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return (buf[positions].astype(np.int64) << 8) | buf[positions + 1]


def encode_runs(xor: np.ndarray, merge_gap: int) -> list[bytes | None]:
    """Run payloads of equally long units; ``None`` where the payload would not be smaller.

    :param xor: ``(units, length)`` ``uint8`` array, the XOR of each unit with its base.
    """
    units, length = xor.shape
    nonzero = xor != 0
    # a payload holds every non-zero byte, 4 header bytes per run and 2 for the count. Units for
    # which that alone does not save 1/32 of the unit are declined before the index arithmetic
    # below (which would spend most of its time on random-looking units, only to find at the end
    # that merged zero gaps push them past the unit). A non-zero byte opens a run when none of the
    # merge_gap + 1 bytes before it is non-zero: a few shifted ORs of the mask count them.
    recent = np.zeros_like(nonzero)  # a non-zero byte among the merge_gap + 1 before
    ahead = np.zeros_like(nonzero)  # ... among the merge_gap + 1 after
    for shift in range(1, min(merge_gap + 1, length - 1) + 1):
        recent[:, shift:] |= nonzero[:, :-shift]
        ahead[:, :-shift] |= nonzero[:, shift:]
    opens = nonzero & ~recent
    runs_per_unit = np.count_nonzero(opens, axis=1)
    dense = 2 + 4 * runs_per_unit + np.count_nonzero(nonzero, axis=1) >= length - length // 32
    if dense.any():
        result: list[bytes | None] = [None] * units
        keep = np.flatnonzero(~dense)
        for i, payload in zip(keep.tolist(), encode_runs(xor[keep], merge_gap), strict=True):
            result[i] = payload
        return result
    # runs open and close within a row (the shifts never cross one), so the n-th opening byte
    # and the n-th closing byte of the flattened masks belong to the same run
    flat_start = np.flatnonzero(opens)
    flat_end = np.flatnonzero(nonzero & ~ahead) + 1
    run_unit = flat_start // length
    run_start = flat_start - run_unit * length
    run_end = flat_end - run_unit * length
    run_size = run_end - run_start
    unit_first_run = _starts(runs_per_unit)
    # gap: zeros since the end of the previous run of the same unit (or since the unit's start)
    previous_end = np.zeros_like(run_end)
    previous_end[1:] = run_end[:-1]
    previous_end[unit_first_run[:-1][runs_per_unit > 0]] = 0
    # headers of all units as one u16 array: [n, gap..., size...] per unit, unit after unit
    header_start = _starts(1 + 2 * runs_per_unit)
    header = np.empty(int(header_start[-1]), dtype=">u2")
    header[header_start[:-1]] = runs_per_unit
    index_in_unit = np.arange(run_unit.shape[0]) - unit_first_run[run_unit]
    gap_at = header_start[run_unit] + 1 + index_in_unit
    header[gap_at] = run_start - previous_end
    header[gap_at + runs_per_unit[run_unit]] = run_size
    literals = xor.reshape(-1)[_inside(units * length, flat_start, flat_end)].tobytes()
    literal_bytes = np.bincount(run_unit, weights=run_size, minlength=units).astype(np.int64)
    literal_start = _starts(literal_bytes).tolist()
    headers = header.tobytes()
    header_bytes = (2 * header_start).tolist()
    sizes = (2 + 4 * runs_per_unit + literal_bytes).tolist()
    return [
        headers[header_bytes[i] : header_bytes[i + 1]] + literals[literal_start[i] : literal_start[i + 1]]
        if sizes[i] < length
        else None
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
        raise RunsError(
            i,
            f"runs cover {int(unit_end[i])} of {int(lengths[i])} bytes with "
            f"{int(covered[i])} literal bytes, the payload holds {int(literal_bytes[i])}",
        )
    unit_start = _starts(lengths)
    run_flat_start = unit_start[run_unit] + run_end - run_size
    xor = np.zeros(int(unit_start[-1]), dtype=np.uint8)
    # literals in payload order are the bytes inside the runs in address order
    header_bytes = (2 + 4 * runs).tolist()
    literals = b"".join([payload[skip:] for payload, skip in zip(payloads, header_bytes, strict=True)])
    xor[_inside(xor.shape[0], run_flat_start, run_flat_start + run_size)] = np.frombuffer(literals, dtype=np.uint8)
    return xor
