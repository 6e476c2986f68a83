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
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import numpy as np

from vmdelta_core.plugin import FormatError
from vmdelta_source_qemu.blocks import RamBlock
from vmdelta_source_qemu.c_migration import PAGE_SIZE

__all__ = ["CheckedEnvelope", "Envelope", "Mapped", "Op", "Run", "pack_forced", "read_envelope"]

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
        """Read an envelope's wire form; damage raises :class:`FormatError` naming the offset.

        Only the wire form is checked here: :func:`read_envelope` checks an envelope against the
        image it is to be applied to.
        """
        meta, ops = _parse(data)
        return cls(meta, [op for _, op in ops])


# ------------------------------------------------------------------------------------------------
# reading an untrusted envelope (apply time)
# ------------------------------------------------------------------------------------------------

#: QEMU machines have a few dozen RAM blocks at most; each mapped-ram block may add up to 1 MiB of
#: alignment gap to the output, so the count is bounded
MAX_BLOCKS = 1024
_MAX_NAME = 255  # block names are u8-length latin-1 strings in the stream
_FORMATS = ("stream", "mapped-ram")


@attrs.frozen
class CheckedEnvelope:
    """An envelope checked against the rebuilt image it is applied to (:func:`read_envelope`).

    Every run and mapped block lies inside a block, every block inside the image, and no page of
    the image is written by more than one run or mapped block, so the artifact written from it is
    at most the envelope's verbatim bytes, twice the image, and 1 MiB of gap per mapped block.
    """

    envelope: Envelope
    blocks: list[RamBlock]
    #: the x-ignore-shared block whose pages go to the RAM file, if any
    external: RamBlock | None


def read_envelope(data: bytes, image_size: int) -> CheckedEnvelope:
    """Read an envelope from an overlay (untrusted) for a rebuilt image of ``image_size`` bytes.

    Every length, offset, count and name is checked before it is used; anything that does not
    hold ends in a :class:`FormatError` naming the field or the envelope offset.
    """
    meta, ops = _parse(data)
    blocks = _blocks(meta, image_size)
    external = _external(meta, blocks)
    pages = image_size // PAGE_SIZE
    covered = np.zeros(pages, bool)
    mapped: set[int] = set()
    # every run or mapped block covers pages no other one does, and verbatim bytes only come between them
    max_ops = 2 * (pages + len(blocks)) + 1
    checked: list[Op] = []
    for at, op in ops:
        if len(checked) >= max_ops:
            raise FormatError(f"QEMU envelope: more operations than a {image_size}-byte image allows (offset {at})")
        if isinstance(op, bytes):
            checked.append(op)
            continue
        if not 0 <= op.block < len(blocks):
            raise FormatError(
                f"QEMU envelope: operation at offset {at} names RAM block {op.block}, there are {len(blocks)}"
            )
        block = blocks[op.block]
        if isinstance(op, Run):
            first, count = op.first_page, op.count
            if count == 0 or first + count > block.pages:
                raise FormatError(
                    f"QEMU envelope: run at offset {at} (pages {first}..{first + count} of block {block.name!r}) "
                    f"does not lie inside the block's {block.pages} pages"
                )
        else:
            if op.block in mapped:
                raise FormatError(f"QEMU envelope: mapped block at offset {at} repeats block {block.name!r}")
            mapped.add(op.block)
            first, count = 0, block.pages
        if len(op.forced) > -(-count // 8):
            raise FormatError(
                f"QEMU envelope: operation at offset {at} has {len(op.forced)} bytes of page bits for {count} pages"
            )
        span = covered[block.first_page + first : block.first_page + first + count]
        if span.any():
            raise FormatError(
                f"QEMU envelope: operation at offset {at} writes pages of block {block.name!r} already written"
            )
        span[:] = True
        checked.append(op)
    return CheckedEnvelope(Envelope(meta, checked), blocks, external)


def _blocks(meta: dict[str, Any], image_size: int) -> list[RamBlock]:
    """The block table: named, page-sized blocks laid one after another over the whole image."""
    if meta.get("format") not in _FORMATS:
        raise FormatError(f"QEMU envelope: metadata format {meta.get('format')!r} is not one of {', '.join(_FORMATS)}")
    table = meta.get("blocks")
    if not isinstance(table, list) or len(table) > MAX_BLOCKS:
        raise FormatError(f"QEMU envelope: metadata 'blocks' is not a list of at most {MAX_BLOCKS} blocks")
    blocks: list[RamBlock] = []
    names: set[str] = set()
    end = 0
    for k, row in enumerate(table):
        where = f"QEMU envelope: metadata blocks[{k}]"
        if not (isinstance(row, list) and len(row) == 3):
            raise FormatError(f"{where} is not [name, offset, length]")
        name, offset, length = row
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME or name in names:
            raise FormatError(f"{where}: the name is not a new block name of 1 to {_MAX_NAME} characters")
        try:
            name.encode("latin-1")
        except UnicodeEncodeError:
            raise FormatError(f"{where}: the name is not latin-1, as block names in a stream are") from None
        for field, value in (("offset", offset), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value % PAGE_SIZE:
                raise FormatError(f"{where}: {field} {value!r} is not a non-negative multiple of {PAGE_SIZE}")
        if offset != end or offset + length > image_size:
            raise FormatError(
                f"{where}: block {name!r} at {offset} (length {length}) does not follow the block before it "
                f"inside the {image_size}-byte image"
            )
        names.add(name)
        blocks.append(RamBlock(name, length, offset))
        end = offset + length
    if end != image_size:
        raise FormatError(f"QEMU envelope: the RAM blocks end at {end}, but the rebuilt image is {image_size} bytes")
    return blocks


def _external(meta: dict[str, Any], blocks: list[RamBlock]) -> RamBlock | None:
    external = meta.get("external", [])
    if not isinstance(external, list) or len(external) > 1 or not all(isinstance(n, str) for n in external):
        raise FormatError("QEMU envelope: metadata 'external' is not a list of at most one block name")
    if not external:
        return None
    block = next((b for b in blocks if b.name == external[0]), None)
    if block is None:
        raise FormatError(f"QEMU envelope names shared block {external[0]!r}, which it does not list")
    return block


def _parse(data: bytes) -> tuple[dict[str, Any], Iterator[tuple[int, Op]]]:
    """The metadata and a lazy walk over ``(offset, operation)`` of an envelope's wire form.

    Lazy so that a caller checking each operation stops at the first bad one before holding
    the rest.
    """
    view = memoryview(data)
    if bytes(view[:8]) != MAGIC:
        raise FormatError("QEMU envelope: bad magic (not written by vmdelta-source-qemu)")
    if len(view) < 12:
        raise FormatError("QEMU envelope truncated at offset 8 (metadata length)")
    (length,) = _U32.unpack_from(view, 8)
    if 12 + length > len(view):
        raise FormatError(f"QEMU envelope: metadata of {length} bytes at offset 12 runs past the end ({len(view)})")
    try:
        meta = json.loads(bytes(view[12 : 12 + length]))
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"QEMU envelope: metadata at offset 12 is not JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise FormatError("QEMU envelope: metadata is not an object")
    return meta, _walk(view, 12 + length)


def _walk(view: memoryview, pos: int) -> Iterator[tuple[int, Op]]:
    def need(at: int, n: int, what: str) -> None:
        if at + n > len(view):
            raise FormatError(f"QEMU envelope truncated at offset {at} ({what} needs {n} bytes, {len(view) - at} left)")

    while True:
        need(pos, 1, "operation tag")
        at, tag = pos, view[pos]
        pos += 1
        if tag == _OP_END:
            break
        if tag == _OP_BYTES:
            need(pos, 4, "length")
            (n,) = _U32.unpack_from(view, pos)
            need(pos + 4, n, "verbatim bytes")
            op: Op = bytes(view[pos + 4 : pos + 4 + n])
            pos += 4 + n
        elif tag == _OP_RUN:
            need(pos, _RUN.size + 4, "run")
            block, first, count, named = _RUN.unpack_from(view, pos)
            (n,) = _U32.unpack_from(view, pos + _RUN.size)
            pos += _RUN.size + 4
            need(pos, n, "page bits")
            if named > 1:
                raise FormatError(f"QEMU envelope: run at offset {at} has flag byte {named}, not 0 or 1")
            op = Run(block, first, count, bool(named), bytes(view[pos : pos + n]))
            pos += n
        elif tag == _OP_MAPPED:
            need(pos, 6, "mapped block")
            (block,) = _U16.unpack_from(view, pos)
            (n,) = _U32.unpack_from(view, pos + 2)
            need(pos + 6, n, "page bits")
            op = Mapped(block, bytes(view[pos + 6 : pos + 6 + n]))
            pos += 6 + n
        else:
            raise FormatError(f"QEMU envelope: unknown operation {tag} at offset {at}")
        yield at, op
    if pos != len(view):
        raise FormatError(f"QEMU envelope: {len(view) - pos} bytes after its end at offset {pos}")
