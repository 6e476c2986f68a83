"""The overlay package of the original VM-synthesis system, field by field (``docs/elijah.md``).

A package is a zip whose members are stored, not deflated: ``overlay-meta``, a msgpack map that
names the base VM (the SHA-256 of its disk), the sizes of the resumed VM's disk and memory and
each blob with the chunks it holds; and the blobs, each one xz stream of DeltaItems back to back
in the original byte layout (the same records vmdelta's frames hold).

Packages come from elsewhere: everything here is checked before it is used. The zip directory is
bounded before :mod:`zipfile` reads it, members may not overlap, be compressed or encrypted, and
must be exactly those the meta names; the meta is unpacked with msgpack's own size limits and then
checked key by key; a blob is decompressed piece by piece and never past what its claimed items
can fill. Any breach ends in one :class:`FormatError`.
"""

from __future__ import annotations

import lzma
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import msgpack
import numpy as np

from vmdelta_core.errors import FormatError
from vmdelta_core.overlay.metadata import MAX_IMAGE_SIZE
from vmdelta_core.overlay.schema import ItemType, Ref

__all__ = [
    "CHUNK",
    "COMPRESSION_LZMA",
    "META_NAME",
    "ZIP_COMMENT",
    "BlobInfo",
    "Item",
    "ItemStream",
    "PackageMeta",
    "PackageReader",
    "blob_name",
    "inflate",
    "parse_self_index",
    "self_index",
]

ZIP_COMMENT = b"Cloudlet VM overlay"
META_NAME = "overlay-meta"
BLOB_PREFIX = "overlay-blob_"
#: the ``overlay_compression`` values the original knew; only LZMA was ever written to packages
COMPRESSION_LZMA = 1
_COMPRESSION_NAMES = {1: "LZMA", 2: "bzip2", 3: "gzip"}
#: the unit of memory and disk in the original system: chunk lists count in it
CHUNK = 4096

KEY_BASE = "base_vm_sha256"
KEY_DISK_SIZE = "resumed_vm_disk_size"
KEY_MEMORY_SIZE = "resumed_vm_memory_size"
KEY_FILES = "overlay_files"
KEY_NAME = "overlay_name"
KEY_COMPRESSION = "overlay_compression"
KEY_SIZE = "overlay_size"
KEY_DISK_CHUNKS = "disk_chunk"
KEY_MEMORY_CHUNKS = "memory_chunk"

#: bounds on what a package may claim (far above anything the original wrote)
MAX_META = 16 << 20  # some 3 million chunks: 12 GiB of changed units
MAX_BLOBS = 1 << 16
MAX_CHUNKS = (MAX_IMAGE_SIZE - 1) // CHUNK + 1
#: the largest record: head, payload length, a whole chunk of payload, live iteration
MAX_ITEM = 11 + 8 + CHUNK + 2
_STEP = 4 << 20  # bytes decompressed or read at a time
_LZMA_MEMLIMIT = 512 << 20  # xz -9e needs 674 MiB to compress but 65 MiB to decompress

_HEAD = struct.Struct("!QHB")
_U64 = struct.Struct("!Q")
_U16 = struct.Struct("!H")
_PAYLOAD_REFS = frozenset({Ref.RAW, Ref.XDELTA, Ref.BSDIFF, Ref.XOR})
_VALUE_REFS = frozenset({Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM})
_KIND_OF_TYPE = {
    ItemType.MEMORY: "memory",
    ItemType.MEMORY_LIVE: "memory",
    ItemType.DISK: "disk",
    ItemType.DISK_LIVE: "disk",
}
_LIVE = frozenset({ItemType.MEMORY_LIVE, ItemType.DISK_LIVE})
#: the low bits of a SELF ref's item index: ``(offset << 1) | tag``
_INDEX_TAG = {"memory": 1, "disk": 2}
_TAG_KIND = {1: "memory", 2: "disk", 3: "memory", 4: "disk"}  # live types as tags, should one appear
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def blob_name(number: int) -> str:
    """The member name of the ``number``-th blob (from 1), as the original named them."""
    return f"{BLOB_PREFIX}{number}"


def self_index(kind: str, offset: int) -> int:
    """The value of a SELF ref to the item of ``kind`` at byte ``offset``."""
    return (offset << 1) | _INDEX_TAG[kind]


def parse_self_index(value: int) -> tuple[str, int]:
    """(kind, byte offset) of the item a SELF ref's value names.

    :raises FormatError: a value no chunk-aligned item has.
    """
    tag = value & (2 * CHUNK - 1)
    kind = _TAG_KIND.get(tag)
    if kind is None:
        raise FormatError(f"a SELF reference's value {value:#x} names no item")
    return kind, (value - tag) >> 1


# --------------------------------------------------------------------------------------------
# overlay-meta
# --------------------------------------------------------------------------------------------


@attrs.frozen
class BlobInfo:
    """One blob as ``overlay-meta`` lists it: the chunks (units of 4096 bytes) of its items."""

    name: str
    size: int
    disk_chunks: tuple[int, ...] = attrs.field(converter=tuple)
    memory_chunks: tuple[int, ...] = attrs.field(converter=tuple)
    compression: int = COMPRESSION_LZMA

    @property
    def item_count(self) -> int:
        return len(self.disk_chunks) + len(self.memory_chunks)


@attrs.frozen
class PackageMeta:
    """The content of ``overlay-meta``."""

    base_vm_sha256: str
    disk_size: int
    memory_size: int
    blobs: tuple[BlobInfo, ...] = attrs.field(converter=tuple)

    def to_msgpack(self) -> bytes:
        return msgpack.packb(
            {
                KEY_BASE: self.base_vm_sha256,
                KEY_DISK_SIZE: self.disk_size,
                KEY_MEMORY_SIZE: self.memory_size,
                KEY_FILES: [
                    {
                        KEY_NAME: blob.name,
                        KEY_COMPRESSION: blob.compression,
                        KEY_SIZE: blob.size,
                        KEY_DISK_CHUNKS: list(blob.disk_chunks),
                        KEY_MEMORY_CHUNKS: list(blob.memory_chunks),
                    }
                    for blob in self.blobs
                ],
            },
            use_bin_type=True,
        )

    @classmethod
    def from_msgpack(cls, data: bytes) -> PackageMeta:
        """Unpack and check ``overlay-meta``: every key the package needs, its type and range.

        Keys may be msgpack str or bin (the original wrote Python 2 strings); keys the mapping
        does not use (a title, forwarded ports) are ignored.

        :raises FormatError: naming the first field that is missing or wrong.
        """
        try:
            raw = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=False,
                use_list=True,
                max_str_len=1 << 16,
                max_bin_len=1 << 16,
                max_array_len=max(MAX_BLOBS, len(data)),
                max_map_len=1 << 10,
                max_ext_len=0,
            )
        except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
            raise FormatError(f"{META_NAME} is not valid msgpack ({type(exc).__name__}: {exc})"[:300]) from None
        top = _Map(raw, META_NAME)
        files = top.array(KEY_FILES, MAX_BLOBS)
        disk_size = top.integer(KEY_DISK_SIZE, MAX_IMAGE_SIZE - 1)
        memory_size = top.integer(KEY_MEMORY_SIZE, MAX_IMAGE_SIZE - 1)
        digest = top.text(KEY_BASE)
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise FormatError(f"{META_NAME}: {KEY_BASE} is not a SHA-256 in hex")
        blobs = [_blob_info(_Map(entry, f"{META_NAME}: {KEY_FILES}[{k}]")) for k, entry in enumerate(files)]
        names = [blob.name for blob in blobs]
        if len(set(names)) != len(names):
            raise FormatError(f"{META_NAME} names a blob twice")
        _check_chunks(blobs, "memory", memory_size)
        _check_chunks(blobs, "disk", disk_size)
        return cls(digest.lower(), disk_size, memory_size, blobs)


def _check_chunks(blobs: list[BlobInfo], kind: str, size: int) -> None:
    """Every chunk listed is inside its image and listed once: what bounds the items (and so
    the bytes) the blobs may hold, before any is decompressed."""
    units = -(-size // CHUNK)
    lists = [blob.memory_chunks if kind == "memory" else blob.disk_chunks for blob in blobs]
    for blob, chunks in zip(blobs, lists, strict=True):
        if chunks and max(chunks) >= units:
            raise FormatError(f"{META_NAME}: blob {blob.name} lists a {kind} chunk past the {size}-byte {kind} image")
    listed = np.fromiter((c for chunks in lists for c in chunks), dtype=np.int64, count=sum(map(len, lists)))
    listed.sort()
    if (listed[1:] == listed[:-1]).any():
        raise FormatError(f"{META_NAME} lists a {kind} chunk twice")


def _blob_info(entry: _Map) -> BlobInfo:
    name = entry.text(KEY_NAME)
    if not _NAME.fullmatch(name) or name == META_NAME:
        raise FormatError(f"{entry.where}: {KEY_NAME} {name[:80]!r} is not a blob member name")
    compression = entry.integer(KEY_COMPRESSION, 255, optional=True)
    if compression is not None and compression != COMPRESSION_LZMA:
        what = _COMPRESSION_NAMES.get(compression, f"number {compression}")
        raise FormatError(f"{entry.where}: blob {name} is compressed with {what}; packages hold LZMA blobs")
    return BlobInfo(
        name,
        entry.integer(KEY_SIZE, MAX_IMAGE_SIZE - 1),
        entry.chunks(KEY_DISK_CHUNKS),
        entry.chunks(KEY_MEMORY_CHUNKS),
    )


class _Map:
    """A msgpack map being checked; ``where`` names it in messages."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise FormatError(f"{where} is not a map")
        self.value = {_key(k): v for k, v in value.items()}
        self.where = where

    def _get(self, key: str, optional: bool = False) -> Any:
        if key not in self.value:
            if optional:
                return None
            raise FormatError(f"{self.where} has no {key}")
        return self.value[key]

    def integer(self, key: str, highest: int, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if type(value) is not int or not 0 <= value <= highest:
            raise FormatError(f"{self.where}: {key} is not an integer from 0 to {highest}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                raise FormatError(f"{self.where}: {key} is not ASCII text") from None
        if not isinstance(value, str):
            raise FormatError(f"{self.where}: {key} is not text")
        return value

    def array(self, key: str, longest: int) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list) or len(value) > longest:
            raise FormatError(f"{self.where}: {key} is not a list of at most {longest} entries")
        return value

    def chunks(self, key: str) -> tuple[int, ...]:
        value = self.array(key, MAX_CHUNKS)
        if not all(type(c) is int and 0 <= c < MAX_CHUNKS for c in value):
            raise FormatError(f"{self.where}: {key} holds something that is not a chunk number")
        return tuple(value)


def _key(key: Any) -> Any:
    """A map key as text: the original's Python 2 strings may arrive as msgpack bin."""
    if isinstance(key, bytes):
        return key.decode("latin-1")
    return key


# --------------------------------------------------------------------------------------------
# DeltaItem streams
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Item:
    """One DeltaItem of a blob. ``value`` is the u64 of SELF / BASE_* refs; ``payload`` the
    bytes of RAW / XDELTA / BSDIFF / XOR (and the digest of SELF_HASH)."""

    kind: str
    type: int
    offset: int
    length: int
    ref: int
    value: int = 0
    payload: bytes | None = None
    live_seq: int | None = None


class ItemStream:
    """Parses a blob's DeltaItems as its bytes arrive: :meth:`feed` returns the items completed
    so far, :meth:`close` checks that nothing is left half-way."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._buffer = bytearray()
        self._consumed = 0  # bytes of the stream before the buffer

    def feed(self, data: bytes) -> list[Item]:
        self._buffer += data
        items: list[Item] = []
        pos = 0
        while True:
            parsed = self._parse(pos)
            if parsed is None:
                break
            item, pos = parsed
            items.append(item)
        del self._buffer[:pos]
        self._consumed += pos
        return items

    def close(self) -> None:
        if self._buffer:
            raise FormatError(f"{self.where}: its last item at byte {self._consumed} is cut short")

    def _parse(self, pos: int) -> tuple[Item, int] | None:
        buf = self._buffer
        if len(buf) - pos < _HEAD.size:
            return None
        offset, length, info = _HEAD.unpack_from(buf, pos)
        ref, typ = info >> 4, info & 0x0F
        at = self._consumed + pos
        kind = _KIND_OF_TYPE.get(typ)  # type: ignore[call-overload]
        if kind is None:
            raise FormatError(f"{self.where}: item at byte {at} has type {typ:#x}, not memory or disk")
        end = pos + _HEAD.size
        value, payload = 0, None
        if ref in _PAYLOAD_REFS:
            if len(buf) - end < 8:
                return None
            (size,) = _U64.unpack_from(buf, end)
            if size > CHUNK:
                raise FormatError(f"{self.where}: item at byte {at} claims a {size}-byte payload")
            end += 8
            if len(buf) - end < size:
                return None
            payload = bytes(buf[end : end + size])
            end += size
        elif ref in _VALUE_REFS:
            if len(buf) - end < 8:
                return None
            (value,) = _U64.unpack_from(buf, end)
            end += 8
        elif ref == Ref.SELF_HASH:
            if len(buf) - end < 32:
                return None
            payload = bytes(buf[end : end + 32])
            end += 32
        elif ref != Ref.ZEROS:
            raise FormatError(f"{self.where}: item at byte {at} has ref {ref:#x}, which the format does not define")
        live_seq = None
        if typ in _LIVE:
            if len(buf) - end < 2:
                return None
            (live_seq,) = _U16.unpack_from(buf, end)
            end += 2
        return Item(kind, typ, offset, length, ref, value, payload, live_seq), end


def inflate(chunks: Iterable[bytes], bound: int, where: str) -> Iterator[bytes]:
    """Decompress one xz (or LZMA-alone) stream piece by piece; never more than ``bound`` bytes.

    :raises FormatError: damaged data, more output than ``bound``, a stream cut short, or bytes
        after its end.
    """
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_AUTO, memlimit=_LZMA_MEMLIMIT)
    total = 0
    try:
        for chunk in chunks:
            if decompressor.eof:
                if chunk:
                    raise FormatError(f"{where} has bytes after the end of its LZMA stream")
                continue
            data = decompressor.decompress(chunk, max_length=_STEP)
            while True:
                total += len(data)
                if total > bound:
                    raise FormatError(
                        f"{where} decompresses to more than the {bound} bytes its items can fill "
                        "(a decompression bomb, or a damaged package)"
                    )
                if data:
                    yield data
                if decompressor.eof or decompressor.needs_input:
                    break
                data = decompressor.decompress(b"", max_length=_STEP)
            if decompressor.eof and decompressor.unused_data:
                raise FormatError(f"{where} has bytes after the end of its LZMA stream")
    except lzma.LZMAError as exc:
        raise FormatError(f"{where} is not a valid LZMA stream: {exc}") from None
    if not decompressor.eof:
        raise FormatError(f"{where}: its LZMA stream is cut short")


# --------------------------------------------------------------------------------------------
# the zip
# --------------------------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_LOCAL = struct.Struct("<4s5H3L2H")


def _directory_entries(file: BinaryIO, size: int) -> int:
    """How many members the zip's end record claims, read before :mod:`zipfile` allocates one
    object for each (the original's readers trusted it)."""
    tail_start = max(0, size - _EOCD.size - 0xFFFF)
    file.seek(tail_start)
    tail = file.read()
    at = tail.rfind(_EOCD_SIG)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise FormatError("not a zip file (no end of central directory)")
    entries = _EOCD.unpack_from(tail, at)[4]
    if entries == 0xFFFF and at >= _ZIP64_LOCATOR.size:
        sig, _, where, _ = _ZIP64_LOCATOR.unpack_from(tail, at - _ZIP64_LOCATOR.size)
        if sig == b"PK\x06\x07" and where + _ZIP64_EOCD.size <= size:
            file.seek(where)
            record = file.read(_ZIP64_EOCD.size)
            if record[:4] == b"PK\x06\x06":
                entries = _ZIP64_EOCD.unpack(record)[6]
    return entries


class PackageReader:
    """An overlay package opened and its zip structure checked; :attr:`meta` is checked too.

    Members are read only through :meth:`blob_chunks`, piece by piece.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._open()
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> PackageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def _fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}")

    def _open(self) -> None:
        size = self.file.seek(0, 2)
        try:
            claimed = _directory_entries(self.file, size)
        except FormatError as exc:
            raise self._fail(str(exc)) from None
        if claimed > MAX_BLOBS + 1:
            raise self._fail(f"the zip claims {claimed} members, more than {MAX_BLOBS + 1}")
        try:
            self.zip = zipfile.ZipFile(self.file)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, NotImplementedError, EOFError) as exc:
            raise self._fail(f"not a readable zip file ({exc})") from None
        if len(infos) > MAX_BLOBS + 1:
            raise self._fail(f"more than {MAX_BLOBS + 1} members")
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            self._check_member(info, size)
        self._check_no_overlap(infos, size)
        meta_info = self.members.get(META_NAME)
        if meta_info is None:
            raise self._fail(f"no {META_NAME} member: not an overlay package")
        if meta_info.file_size > MAX_META:
            raise self._fail(f"{META_NAME} of {meta_info.file_size} bytes is larger than {MAX_META}")
        data = self._read_whole(meta_info)
        try:
            self.meta = PackageMeta.from_msgpack(data)
        except FormatError as exc:
            raise self._fail(str(exc)) from None
        named = {blob.name for blob in self.meta.blobs}
        for name in self.members:
            if name != META_NAME and name not in named:
                raise self._fail(f"member {name} is not a blob that {META_NAME} names")
        for blob in self.meta.blobs:
            info = self.members.get(blob.name)
            if info is None:
                raise self._fail(f"{META_NAME} names blob {blob.name}, which the package does not hold")
            if info.file_size != blob.size:
                raise self._fail(f"blob {blob.name} holds {info.file_size} bytes, {META_NAME} says {blob.size}")

    def _check_member(self, info: zipfile.ZipInfo, size: int) -> None:
        name = info.filename
        shown = repr(name[:80])
        if not _NAME.fullmatch(name):
            raise self._fail(f"member name {shown} is not a plain file name (no folders, no dot first)")
        if name in self.members:
            raise self._fail(f"member {shown} appears twice")
        if info.flag_bits & 0x1:
            raise self._fail(f"member {shown} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise self._fail(f"member {shown} is compressed in the zip; packages store their members")
        if info.header_offset + info.compress_size > size:
            raise self._fail(f"member {shown} reaches past the end of the file")
        self.members[name] = info

    def _check_no_overlap(self, infos: list[zipfile.ZipInfo], size: int) -> None:
        """Members lie one after the other: a zip whose entries share bytes is how small files
        pretend to hold a great deal."""
        end = 0
        for info in sorted(infos, key=lambda i: i.header_offset):
            self.file.seek(info.header_offset)
            head = self.file.read(_LOCAL.size)
            if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
                raise self._fail(f"member {info.filename!r} has no local header where the directory says")
            fields = _LOCAL.unpack(head)
            start = info.header_offset + _LOCAL.size + fields[9] + fields[10]
            if info.header_offset < end or start + info.compress_size > size:
                raise self._fail(f"member {info.filename!r} overlaps another member")
            end = start + info.compress_size

    def _read_whole(self, info: zipfile.ZipInfo) -> bytes:
        return b"".join(self.member_chunks(info.filename))

    def member_chunks(self, name: str) -> Iterator[bytes]:
        """A member's bytes, a few MiB at a time; its CRC is checked at its end."""
        info = self.members[name]
        try:
            with self.zip.open(info) as f:
                while chunk := f.read(_STEP):
                    yield chunk
        except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
            raise self._fail(f"member {name} cannot be read ({exc})") from None
