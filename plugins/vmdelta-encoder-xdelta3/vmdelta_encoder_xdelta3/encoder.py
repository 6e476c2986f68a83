"""The ``xdelta3`` encoder: a VCDIFF delta of each unit against the base unit at its offset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vmdelta_core.plugin import ConfigError, Encoder, FormatError, Ref
from vmdelta_encoder_xdelta3._library import XD3_COMPLEVEL_SHIFT, XD3_NOCOMPRESS, load_library
from vmdelta_encoder_xdelta3.c_vcdiff import VcdiffError, check_payload

__all__ = ["DEFAULT_LEVEL", "Xdelta3Encoder"]

#: 0 (copy from the base only, literals left to the frame codec) gives the smallest overlays on the
#: real captures; 1-9 compress the literals per unit, which the frame codec then cannot (README)
DEFAULT_LEVEL = 0


class Xdelta3Encoder(Encoder):
    """Per-unit VCDIFF, the classic ``XDELTA`` ref of the original system.

    ``level`` is xdelta3's ``-0``..``-9``: 0 only copies from the base and leaves literals
    uncompressed (for the frame codec to compress), 1-9 also compress the literals against
    themselves. A unit is declined when its delta would not be smaller than the unit: the
    library is given an output buffer one byte short of the unit and gives up when it fills. A
    unit whose base is all zeros is declined too: there is nothing to copy from, and compressing
    the unit on its own loses to the frame codec compressing raw units together.
    """

    name = "xdelta3"
    wire_ref = int(Ref.XDELTA)

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 9:
            raise ConfigError(f"xdelta3: level must be an integer from 0 to 9, not {level!r}")
        self.level = level
        self._flags = XD3_NOCOMPRESS if level == 0 else level << XD3_COMPLEVEL_SHIFT
        self._library = load_library()

    def configure(self, options: Mapping[str, Any]) -> Xdelta3Encoder:
        """A copy with the pipeline's options applied (``level``)."""
        unknown = set(options) - {"level"}
        if unknown:
            raise ConfigError(f"xdelta3: unknown option(s) {', '.join(sorted(unknown))}; it takes: level")
        return Xdelta3Encoder(level=options.get("level", self.level))

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        encode, flags = self._library.encode, self._flags
        out: list[bytes | None] = []
        for base, target in zip(bases, targets, strict=True):
            length, source = len(target), bytes(base)  # a 4 KiB copy costs less than pinning a view
            if length < 2 or source.count(0) == len(source):
                out.append(None)
                continue
            out.append(encode(source, bytes(target), length - 1, flags))
        return out

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        library = self._library
        out: list[bytes] = []
        for base, payload, length in zip(bases, payloads, lengths, strict=True):
            data, source = bytes(payload), bytes(base)
            try:
                check_payload(data, len(source), length)
            except VcdiffError as exc:
                raise FormatError(f"xdelta3 payload: {exc}") from None
            status, unit = library.decode(source, data, length)
            if status != 0:
                reason = "it decodes to a different length" if status == -1 else library.strerror(status)
                raise FormatError(f"xdelta3 payload does not decode: {reason}")
            out.append(unit)
        return out
