"""The ``bsdiff`` encoder: a BSDIFF40 patch of each unit against the base unit at its offset."""

from __future__ import annotations

import bz2
from collections.abc import Sequence

import bsdiff4.core

from vmdelta_core.plugin import Encoder, FormatError, Ref
from vmdelta_encoder_bsdiff.c_bsdiff40 import HEADER_SIZE, pack_header, unpack_header

__all__ = ["BsdiffEncoder", "max_control_entries"]

# bzip2's level only sets its block size (100 kB x level); a unit fits in the smallest block, and
# the smaller block keeps the decompressor's working memory at ~0.4 MB instead of ~3.6 MB
_BZ2_LEVEL = 1


def max_control_entries(length: int) -> int:
    """The most (add, copy, seek) triples accepted for a unit: bounds the control block to ~3x
    the unit. bsdiff emits one triple per match of 8+ bytes, so real patches stay far below."""
    return length // 8 + 16


class BsdiffEncoder(Encoder):
    """Per-unit bsdiff (the classic ``BSDIFF`` ref, ``0x7``).

    bsdiff4's C core finds the patch (it releases the GIL around the suffix sort and the scan);
    the three blocks are bzip2-compressed as the format demands, which is what makes bsdiff
    payloads nearly incompressible for the frame codec. Decoding decompresses each block with a
    bound, checks the header against the unit, then lets bsdiff4 apply the patch (it checks
    every control triple against the buffers).
    """

    name = "bsdiff"
    wire_ref = int(Ref.BSDIFF)

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for base, target in zip(bases, targets, strict=True):
            length, source = len(target), bytes(base)
            if source.count(0) == len(source):
                # nothing to diff against: the patch would be the unit bzip2-compressed on its
                # own, which loses to the frame codec compressing raw units together
                out.append(None)
                continue
            control, diff, extra = bsdiff4.core.diff(source, bytes(target))
            if len(control) // 24 > max_control_entries(length):
                out.append(None)
                continue
            blocks = [bz2.compress(block, _BZ2_LEVEL) for block in (control, diff, extra)]
            if HEADER_SIZE + sum(map(len, blocks)) >= length:
                out.append(None)
                continue
            out.append(b"".join([pack_header(len(blocks[0]), len(blocks[1]), length), *blocks]))
        return out

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        out: list[bytes] = []
        for base, payload, length in zip(bases, payloads, lengths, strict=True):
            data = bytes(payload)
            try:
                control_length, diff_length, new_length = unpack_header(data)
                if new_length != length:
                    raise ValueError(f"it rebuilds {new_length} bytes, not the {length}-byte unit")
                diff_start = HEADER_SIZE + control_length
                extra_start = diff_start + diff_length
                if extra_start > len(data):
                    raise ValueError("its block sizes run past the end of the payload")
                control = _bunzip2(data[HEADER_SIZE:diff_start], 24 * max_control_entries(length), "control")
                diff = _bunzip2(data[diff_start:extra_start], length, "diff")
                extra = _bunzip2(data[extra_start:], length, "extra")
                unit = bsdiff4.core.patch(bytes(base), length, control, diff, extra)
            except ValueError as exc:
                raise FormatError(f"bsdiff payload: {exc}") from None
            out.append(unit)
        return out


def _bunzip2(data: bytes, limit: int, what: str) -> bytes:
    """Decompress one block, refusing more than ``limit`` bytes, truncation or trailing bytes."""
    decompressor = bz2.BZ2Decompressor()
    try:
        block = decompressor.decompress(data, max_length=limit + 1)
    except (OSError, EOFError) as exc:
        raise ValueError(f"the {what} block does not decompress ({exc})") from None
    if len(block) > limit:
        raise ValueError(f"the {what} block holds more than {limit} bytes")
    if not decompressor.eof or decompressor.unused_data:
        raise ValueError(f"the {what} block is truncated or followed by stray bytes")
    return block
