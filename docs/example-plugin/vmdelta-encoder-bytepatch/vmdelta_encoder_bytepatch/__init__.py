"""The ``bytepatch`` encoder: a unit as the runs of bytes where it differs from its base.

Payload: repeated ``u16 offset, u16 length, bytes``, big-endian. Good for small edits in place;
it declines a unit when the runs would not be smaller than the unit itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import numpy as np

from vmdelta_core.plugin import Encoder, FormatError, hookimpl

_RUN = struct.Struct(">HH")


class BytePatchEncoder(Encoder):
    name = "bytepatch"

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for base, target in zip(bases, targets, strict=True):
            t = np.frombuffer(target, dtype=np.uint8)
            differ = np.frombuffer(base, dtype=np.uint8) != t
            edges = np.flatnonzero(np.diff(np.concatenate(([False], differ, [False])).astype(np.int8)))
            runs = edges.reshape(-1, 2).tolist()
            if 4 * len(runs) + int(differ.sum()) >= len(target):
                out.append(None)
                continue
            out.append(b"".join(_RUN.pack(a, b - a) + t[a:b].tobytes() for a, b in runs))
        return out

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        out = []
        for base, payload, length in zip(bases, payloads, lengths, strict=True):
            unit = bytearray(base[:length])
            pos = 0
            while pos < len(payload):
                if pos + 4 > len(payload):
                    raise FormatError("bytepatch: a run header is cut short")
                offset, size = _RUN.unpack_from(payload, pos)
                pos += 4
                if offset + size > length or pos + size > len(payload):
                    raise FormatError("bytepatch: a run lies outside the unit or the payload")
                unit[offset : offset + size] = payload[pos : pos + size]
                pos += size
            out.append(bytes(unit))
        return out


@hookimpl
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    register(BytePatchEncoder())
