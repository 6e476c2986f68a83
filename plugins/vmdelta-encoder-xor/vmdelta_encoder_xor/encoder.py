"""The ``xor`` encoder: the XOR of a unit with the base unit at its offset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vmdelta_core.plugin import ConfigError, Encoder, FormatError, Ref
from vmdelta_encoder_xor.runs import RunsError, decode_runs, encode_runs

__all__ = ["DEFAULT_MERGE_GAP", "MODES", "XorEncoder"]

MODES = ("runs", "plain")
#: a gap of up to this many zero bytes stays inside a run; 4 is the break-even of a run header
DEFAULT_MERGE_GAP = 4


def _concat(views: Sequence[memoryview], lengths: Sequence[int]) -> np.ndarray:
    parts = [v if len(v) == n else bytes(v)[:n].ljust(n, b"\0") for v, n in zip(views, lengths, strict=True)]
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


class XorEncoder(Encoder):
    """XOR against the base (the classic ``XOR`` ref, ``0x9``), by whole batches in numpy.

    ``mode="runs"`` (the default) stores only the runs of non-zero XOR bytes (see
    :mod:`vmdelta_encoder_xor.runs`) and declines a unit when that is not smaller than the unit.
    ``mode="plain"`` stores the full XOR and leaves its zeros to the frame codec; such a payload
    is exactly as long as the unit, so it never declines and is meant for measurement. Decoding
    tells the two apart by length (a runs payload is always shorter than its unit), so an
    overlay may mix them.
    """

    name = "xor"
    wire_ref = int(Ref.XOR)
    #: part of the default encoder list: under the ``best`` policy it made the real captures'
    #: overlays 7-9% smaller than raw units alone (README, "Recommendation")
    default_priority = 10

    def __init__(self, mode: str = "runs", merge_gap: int = DEFAULT_MERGE_GAP) -> None:
        if mode not in MODES:
            raise ConfigError(f"xor: mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not isinstance(merge_gap, int) or isinstance(merge_gap, bool) or not 0 <= merge_gap <= 15:
            raise ConfigError(f"xor: merge_gap must be an integer from 0 to 15, not {merge_gap!r}")
        self.mode = mode
        self.merge_gap = merge_gap

    def configure(self, options: Mapping[str, Any]) -> XorEncoder:
        """A copy with the pipeline's options applied (``mode``, ``merge_gap``)."""
        unknown = set(options) - {"mode", "merge_gap"}
        if unknown:
            raise ConfigError(f"xor: unknown option(s) {', '.join(sorted(unknown))}; it takes: mode, merge_gap")
        return XorEncoder(mode=options.get("mode", self.mode), merge_gap=options.get("merge_gap", self.merge_gap))

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        if not targets:
            return []
        lengths = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
        if lengths.max() > 0xFFFF:
            raise ConfigError("xor: units are at most 65535 bytes")
        xor = _concat(targets, lengths.tolist()) ^ _concat(bases, lengths.tolist())
        if self.mode == "runs":
            # units of one length at a time (all but an image's short last unit), as 2-D arrays
            out: list[bytes | None] = [None] * len(targets)
            starts = np.cumsum(lengths) - lengths
            for length in np.unique(lengths).tolist():
                rows = np.flatnonzero(lengths == length)
                if rows.size == len(targets):
                    block = xor.reshape(rows.size, length)
                else:
                    block = xor[(starts[rows, None] + np.arange(length)).reshape(-1)].reshape(rows.size, length)
                for i, payload in zip(rows.tolist(), encode_runs(block, self.merge_gap), strict=True):
                    out[i] = payload
            return out
        blob = xor.tobytes()
        ends = np.cumsum(lengths).tolist()
        return [blob[end - n : end] for end, n in zip(ends, lengths.tolist(), strict=True)]

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        if not payloads:
            return []
        sizes = [len(p) for p in payloads]
        plain = [i for i, (size, n) in enumerate(zip(sizes, lengths, strict=True)) if size == n]
        runs = [i for i, (size, n) in enumerate(zip(sizes, lengths, strict=True)) if size < n]
        if len(plain) + len(runs) < len(payloads):
            i = next(i for i, (size, n) in enumerate(zip(sizes, lengths, strict=True)) if size > n)
            raise FormatError(f"xor payload {i} of the batch: {sizes[i]} bytes for a {lengths[i]}-byte unit")
        xor_parts: dict[int, np.ndarray] = {}
        if runs:
            run_lengths = np.array([lengths[i] for i in runs], dtype=np.int64)
            try:
                flat = decode_runs([bytes(payloads[i]) for i in runs], run_lengths)
            except RunsError as exc:
                raise FormatError(f"xor payload {runs[exc.index]} of the batch: {exc}") from None
            for i, start, n in zip(runs, np.cumsum(run_lengths) - run_lengths, run_lengths, strict=True):
                xor_parts[i] = flat[start : start + n]
        for i in plain:
            xor_parts[i] = np.frombuffer(payloads[i], dtype=np.uint8)
        xor = np.concatenate([xor_parts[i] for i in range(len(payloads))])
        blob = (xor ^ _concat(bases, list(lengths))).tobytes()
        out, pos = [], 0
        for n in lengths:
            out.append(blob[pos : pos + n])
            pos += n
        return out
