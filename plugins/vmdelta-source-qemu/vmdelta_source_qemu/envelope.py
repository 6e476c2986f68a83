"""The envelope: everything in a snapshot file that is not RAM pages, as a list of operations.

An artifact is rebuilt by running the operations in order: ``bytes`` are copied as they are
(headers, the block table, device sections, footers, the VM description, and any record the
image cannot stand for), a :class:`Run` writes consecutive ZERO/PAGE records of one block whose
kinds follow from the image (PAGE for a page with data, ZERO for an all-zero page; QEMU chooses
the same way), and a :class:`Mapped` writes a mapped-ram block (bitmap and pages at fixed
offsets). Two snapshots of one VM give nearly the same operations, so the envelope of one
compresses well against the other's.

Wire form (big-endian): magic ``QEMUENV1``, u32 length + JSON metadata, then operations, each a
tag byte: ``1`` bytes (u32 length, data), ``2`` run (u16 block, u64 first page, u32 count, u8
named, u32 length + forced-page bits), ``3`` mapped block (u16 block, u32 length + forced bits),
``0`` end. Forced bits (LSB first) mark pages sent as PAGE although they are all zero.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from vmdelta_core.errors import FormatError

__all__ = ["Envelope", "Mapped", "Op", "Run"]

MAGIC = b"QEMUENV1"
_OP_END, _OP_BYTES, _OP_RUN, _OP_MAPPED = 0, 1, 2, 3
_RUN = struct.Struct(">HQIB")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


@attrs.frozen
class Run:
    """``count`` records for pages ``first_page..`` of block ``block``, each right after the other."""

    block: int
    first_page: int
    count: int
    #: the first record names its block (no CONTINUE flag)
    named: bool
    #: packed bits over the run (LSB first): pages sent as PAGE though all zero; empty when none
    forced: bytes = b""

    def forced_mask(self) -> np.ndarray:
        return _unpack(self.forced, self.count)


@attrs.frozen
class Mapped:
    """A mapped-ram block: its bitmap at the current file offset, then its pages at a fixed offset."""

    block: int
    forced: bytes = b""

    def forced_mask(self, pages: int) -> np.ndarray:
        return _unpack(self.forced, pages)


Op = bytes | Run | Mapped


def _unpack(bits: bytes, n: int) -> np.ndarray:
    if not bits:
        return np.zeros(n, bool)
    return np.unpackbits(np.frombuffer(bits, np.uint8), count=n, bitorder="little").astype(bool)


def pack_forced(mask: np.ndarray) -> bytes:
    """Forced-page bits for :class:`Run` / :class:`Mapped`, empty when no page is forced."""
    return np.packbits(mask, bitorder="little").tobytes() if mask.any() else b""


@attrs.frozen
class Envelope:
    """Metadata (format, block table, blocks from an external RAM file) and the operations."""

    meta: dict[str, Any]
    ops: Sequence[Op]

    def to_bytes(self) -> bytes:
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode()
        out = [MAGIC, _U32.pack(len(meta)), meta]
        for op in self.ops:
            if isinstance(op, Run):
                out += [
                    bytes([_OP_RUN]),
                    _RUN.pack(op.block, op.first_page, op.count, op.named),
                    _U32.pack(len(op.forced)),
                    op.forced,
                ]
            elif isinstance(op, Mapped):
                out += [bytes([_OP_MAPPED]), _U16.pack(op.block), _U32.pack(len(op.forced)), op.forced]
            else:
                out += [bytes([_OP_BYTES]), _U32.pack(len(op)), op]
        out.append(bytes([_OP_END]))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Read an envelope; damage raises :class:`FormatError` naming the offset."""
        view = memoryview(data)
        try:
            if bytes(view[:8]) != MAGIC:
                raise FormatError("QEMU envelope: bad magic (not written by vmdelta-source-qemu)")
            (length,) = _U32.unpack_from(view, 8)
            meta = json.loads(bytes(view[12 : 12 + length]))
            pos = 12 + length
            ops: list[Op] = []
            while True:
                tag = view[pos]
                pos += 1
                if tag == _OP_END:
                    break
                if tag == _OP_BYTES:
                    (n,) = _U32.unpack_from(view, pos)
                    if pos + 4 + n > len(view):
                        raise IndexError
                    ops.append(bytes(view[pos + 4 : pos + 4 + n]))
                    pos += 4 + n
                elif tag == _OP_RUN:
                    block, first, count, named = _RUN.unpack_from(view, pos)
                    pos += _RUN.size
                    (n,) = _U32.unpack_from(view, pos)
                    ops.append(Run(block, first, count, bool(named), bytes(view[pos + 4 : pos + 4 + n])))
                    pos += 4 + n
                elif tag == _OP_MAPPED:
                    (block,) = _U16.unpack_from(view, pos)
                    (n,) = _U32.unpack_from(view, pos + 2)
                    ops.append(Mapped(block, bytes(view[pos + 6 : pos + 6 + n])))
                    pos += 6 + n
                else:
                    raise FormatError(f"QEMU envelope: unknown operation {tag} at offset {pos - 1}")
        except (IndexError, struct.error, ValueError) as exc:
            raise FormatError(f"QEMU envelope damaged or truncated ({exc or 'short'})") from None
        if not isinstance(meta, dict):
            raise FormatError("QEMU envelope: metadata is not an object")
        return cls(meta, ops)
