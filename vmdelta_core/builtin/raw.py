"""The ``raw`` encoder: the unit as it is. It never declines, so every policy can end with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vmdelta_core.components import Encoder
from vmdelta_core.errors import FormatError
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.overlay.schema import Ref


class RawEncoder(Encoder):
    name = "raw"
    wire_ref = int(Ref.RAW)

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        return [bytes(target) for target in targets]

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        for payload, length in zip(payloads, lengths, strict=True):
            if len(payload) != length:
                raise FormatError(f"raw payload of {len(payload)} bytes for a {length}-byte unit")
        return [bytes(payload) for payload in payloads]


@hookimpl
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    register(RawEncoder())
