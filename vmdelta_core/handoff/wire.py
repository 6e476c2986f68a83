"""The relay format of a handoff: a live migration stream, its pages replaced by live DeltaItems.

A handoff carries the stream QEMU sends during a live migration to the host that holds its base.
The stream is cut into what is reproduced verbatim (QEMU's framing, the RAM block table, device
state) and the pages of RAM; each page travels as a ``MEMORY_LIVE`` DeltaItem whose ``live_seq``
is the migration pass it was sent in, most of them references to a base or to a page the
destination already holds. The receiver puts the identical stream back together for
``qemu-system-x86_64 -incoming``. ``schemas/handoff-v1.md`` specifies the bytes.

Records, each checked before it is used::

    tag u8 | body length u32 | XXH3-64 of the body u64 | body

``FRAME`` bodies are zstd-compressed runs of operations; ``END`` holds the length and the
XXH3-128 digest of the whole stream, so that the receiver releases the stream's end (the device
state QEMU resumes from) only once every byte before it is proven. Version 2 adds the guest's
disk: ``DISK`` operations of ``DISK_LIVE`` items, counted and digested in a longer ``END``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import attrs
import xxhash
import zstandard

from vmdelta_core.errors import FormatError
from vmdelta_core.overlay.items import ItemColumns, pack_items, unpack_items

__all__ = [
    "MAX_BODY",
    "MAX_OPS_BYTES",
    "DiskRun",
    "End",
    "Run",
    "Verbatim",
    "pack_run",
    "read_records",
    "write_end",
    "write_frame",
]

TAG_FRAME = 0x01
TAG_END = 0x02
_RECORD = struct.Struct(">BIQ")
_END = struct.Struct(">QQ16s")
#: version 2's end: the stream's, then the disk blocks written and their digest
_END_DISK = struct.Struct(">QQ16sQ16s")
#: a record's body, compressed, at most (a frame holds a bounded run of pages)
MAX_BODY = 32 << 20
#: a frame's operations once decompressed, at most
MAX_OPS_BYTES = 64 << 20

OP_VERBATIM = 0x00
OP_RUN = 0x01
OP_DISK = 0x02
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


@attrs.frozen
class Verbatim:
    """Bytes of the stream reproduced as they are."""

    data: bytes


@attrs.frozen
class Run:
    """Pages of the stream: before page ``i``, the verbatim bytes ``prefixes[i]``; the pages
    themselves are the ``items`` (one unit each, in stream order)."""

    prefixes: list[bytes]
    items: ItemColumns


@attrs.frozen
class DiskRun:
    """Blocks of the guest's disk (version 2): ``DISK_LIVE`` items, one block each."""

    items: ItemColumns


@attrs.frozen
class End:
    """The stream is whole: ``length`` bytes, ``digest`` their XXH3-128, in ``frames`` frames;
    version 2 adds the ``disk_blocks`` written and the XXH3-128 of their offsets and bytes."""

    length: int
    frames: int
    digest: bytes
    disk_blocks: int = 0
    disk_digest: bytes = bytes(16)


def write_frame(out: BinaryIO, ops: list[Verbatim | tuple[list[bytes], bytes] | bytes], level: int = 3) -> int:
    """Write one frame of operations (a ``Verbatim``, a run given as its prefixes and its packed
    items, or packed disk items as ``bytes``); returns the bytes written."""
    parts: list[bytes] = []
    for op in ops:
        if isinstance(op, Verbatim):
            parts += [bytes([OP_VERBATIM]), _U32.pack(len(op.data)), op.data]
        elif isinstance(op, bytes):
            parts += [bytes([OP_DISK]), _U32.pack(len(op)), op]
        else:
            prefixes, items = op
            if any(len(p) > 0xFFFF for p in prefixes):
                raise ValueError("a page's prefix holds at most 65535 bytes")
            parts += [bytes([OP_RUN]), _U32.pack(len(prefixes))]
            parts += [_U16.pack(len(p)) for p in prefixes]
            parts += [*prefixes, _U32.pack(len(items)), items]
    body = zstandard.ZstdCompressor(level=level).compress(b"".join(parts))
    return _write_record(out, TAG_FRAME, body)


def write_end(out: BinaryIO, end: End, version: int = 1) -> int:
    if version == 1:
        return _write_record(out, TAG_END, _END.pack(end.length, end.frames, end.digest))
    body = _END_DISK.pack(end.length, end.frames, end.digest, end.disk_blocks, end.disk_digest)
    return _write_record(out, TAG_END, body)


def _write_record(out: BinaryIO, tag: int, body: bytes) -> int:
    if len(body) > MAX_BODY:
        raise ValueError(f"a record of {len(body)} bytes; at most {MAX_BODY}")
    out.write(_RECORD.pack(tag, len(body), xxhash.xxh3_64_intdigest(body)))
    out.write(body)
    return _RECORD.size + len(body)


def read_records(stream: BinaryIO, name: str, version: int = 1) -> Iterator[Verbatim | Run | DiskRun | End]:
    """The operations of every frame, then the ``End``, each record checked first; a stream cut
    short, damaged, or going on after its end, or holding what its ``version`` lacks, is a
    :class:`FormatError`."""
    frames = 0
    end_format = _END if version == 1 else _END_DISK
    while True:
        head = _exactly(stream, _RECORD.size, name, "a record header")
        tag, length, checksum = _RECORD.unpack(head)
        if tag not in (TAG_FRAME, TAG_END):
            raise FormatError(f"{name}: unknown record tag {tag:#x} after frame {frames}")
        if length > MAX_BODY:
            raise FormatError(f"{name}: a record of {length} bytes; at most {MAX_BODY}")
        body = _exactly(stream, length, name, "a record")
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise FormatError(f"{name}: record {frames} is damaged (checksum mismatch)")
        if tag == TAG_END:
            if length != end_format.size:
                raise FormatError(f"{name}: an end record of {length} bytes")
            total, count, digest, *disk = end_format.unpack(body)
            if count != frames:
                raise FormatError(f"{name}: the end record counts {count} frames; {frames} came")
            if stream.read(1):
                raise FormatError(f"{name}: data after the end of the handoff")
            yield End(total, count, digest, *disk)
            return
        frames += 1
        yield from _operations(_decompressed(body, name, frames), name, frames, version)


def _decompressed(body: bytes, name: str, number: int) -> bytes:
    try:
        ops = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{name}: frame {number} does not decompress: {exc}") from None
    if len(ops) > MAX_OPS_BYTES:
        raise FormatError(f"{name}: frame {number} holds more than {MAX_OPS_BYTES} bytes")
    return ops


def _operations(ops: bytes, name: str, number: int, version: int) -> Iterator[Verbatim | Run | DiskRun]:
    view, pos = memoryview(ops), 0

    def take(count: int) -> memoryview:
        nonlocal pos
        if pos + count > len(view):
            raise FormatError(f"{name}: frame {number} ends inside an operation")
        pos += count
        return view[pos - count : pos]

    while pos < len(view):
        kind = take(1)[0]
        if kind == OP_VERBATIM:
            (length,) = _U32.unpack(take(4))
            yield Verbatim(bytes(take(length)))
        elif kind == OP_RUN:
            (count,) = _U32.unpack(take(4))
            if count * 2 > len(view) - pos:
                raise FormatError(f"{name}: frame {number} claims {count} pages")
            lengths = struct.unpack(f">{count}H", take(2 * count))
            prefixes = [bytes(take(n)) for n in lengths]
            (size,) = _U32.unpack(take(4))
            items = _items(take(size), name, number)
            if len(items) != count:
                raise FormatError(f"{name}: frame {number} has {count} prefixes for {len(items)} pages")
            yield Run(prefixes, items)
        elif kind == OP_DISK and version >= 2:
            (size,) = _U32.unpack(take(4))
            yield DiskRun(_items(take(size), name, number))
        else:
            raise FormatError(f"{name}: frame {number} holds an unknown operation {kind:#x}")


def _items(data: memoryview, name: str, number: int) -> ItemColumns:
    try:
        return unpack_items(data)
    except (ValueError, IndexError, struct.error) as exc:
        raise FormatError(f"{name}: frame {number} holds damaged items: {exc}") from None


def _exactly(stream: BinaryIO, count: int, name: str, what: str) -> bytes:
    chunks, need = [], count
    while need:
        chunk = stream.read(need)
        if not chunk:
            raise FormatError(f"{name}: the handoff was cut short (in {what})")
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def pack_run(
    offsets: list[int],
    unit: int,
    refs: list[int],
    values: list[int],
    payloads: list[bytes | None],
    seq: int,
    typ: int,
) -> bytes:
    """Packed live items of one ``unit`` each, sent in pass ``seq`` (``typ``: MEMORY_LIVE or
    DISK_LIVE)."""
    n = len(offsets)
    return pack_items(offsets, [unit] * n, refs, [typ] * n, values, payloads, [seq] * n)
