"""Finding the volumes of a disk image: a whole-disk filesystem, MBR or GPT partitions."""

from __future__ import annotations

import zlib

import attrs
import construct
import numpy as np

from vmdelta_core.plugin import FormatError
from vmdelta_filter_xray.c_disk import GPT_ENTRY, GPT_HEADER, MBR

__all__ = ["Volume", "find_volumes"]

SECTOR = 512
_EXTENDED = {0x05, 0x0F, 0x85}
_GPT_PROTECTIVE = 0xEE
_MAX_LOGICAL = 128
_MAX_GPT_TABLE = 65536 * 128  # bytes: the most entries this reader takes, of the usual size


@attrs.frozen
class Volume:
    """A byte range of the disk image that may hold a filesystem."""

    name: str
    offset: int
    length: int
    #: MBR type byte as ``0x83`` or GPT type GUID, ``""`` for a whole-disk volume
    type: str = ""


def _read(data: np.ndarray, offset: int, length: int) -> bytes:
    return bytes(data[offset : offset + length])


def find_volumes(data: np.ndarray) -> tuple[list[Volume], str]:
    """The volumes of the disk and how they were found (``whole disk``, ``mbr``, ``gpt``).

    A filesystem starting at byte 0 wins over a partition table (it cannot have one); a boot
    sector whose entries do not fit the disk (a FAT or NTFS volume) is one whole-disk volume.
    """
    size = int(data.shape[0])
    if size >= 2048 and _read(data, 1080, 2) == b"\x53\xef":
        return [Volume("whole disk", 0, size)], "whole disk"
    if size < 2 * SECTOR or _read(data, 510, 2) != b"\x55\xaa":
        return [Volume("whole disk", 0, size)], "whole disk"
    mbr = MBR.parse(_read(data, 0, 512))
    entries = [e for e in mbr.partitions if e.type != 0]
    if any(e.status not in (0x00, 0x80) for e in entries) or any(
        (e.lba_start + e.sectors) * SECTOR > size or e.sectors == 0 for e in entries
    ):
        return [Volume("whole disk", 0, size)], "whole disk"
    if any(e.type == _GPT_PROTECTIVE for e in entries):
        return _gpt(data), "gpt"
    volumes: list[Volume] = []
    for number, entry in enumerate(mbr.partitions, 1):
        if entry.type == 0:
            continue
        if entry.type in _EXTENDED:
            volumes.extend(_logical(data, entry.lba_start))
        else:
            volumes.append(
                Volume(f"mbr {number}", entry.lba_start * SECTOR, entry.sectors * SECTOR, f"0x{entry.type:02x}")
            )
    return volumes, "mbr"


def _logical(data: np.ndarray, extended_lba: int) -> list[Volume]:
    """Logical partitions: a chain of EBRs, each pointing at the next relative to the extended one."""
    size = int(data.shape[0])
    out: list[Volume] = []
    ebr_lba = extended_lba
    for number in range(5, 5 + _MAX_LOGICAL):
        offset = ebr_lba * SECTOR
        if offset + SECTOR > size:
            raise FormatError(f"xray: extended boot record at byte {offset} lies beyond the disk")
        try:
            ebr = MBR.parse(_read(data, offset, SECTOR))
        except construct.ConstructError:
            raise FormatError(f"xray: no extended boot record signature at byte {offset}") from None
        first, link = ebr.partitions[0], ebr.partitions[1]
        if first.type != 0 and first.sectors:
            start = (ebr_lba + first.lba_start) * SECTOR
            length = first.sectors * SECTOR
            if start + length > size:
                raise FormatError(f"xray: logical partition {number} (EBR at byte {offset}) ends beyond the disk")
            out.append(Volume(f"mbr {number}", start, length, f"0x{first.type:02x}"))
        if link.type == 0 or link.lba_start == 0:
            return out
        ebr_lba = extended_lba + link.lba_start
    raise FormatError(f"xray: more than {_MAX_LOGICAL} logical partitions: the EBR chain loops")


def _gpt(data: np.ndarray) -> list[Volume]:
    """Partitions of the primary GPT, or of the backup one when the primary is damaged."""
    size = int(data.shape[0])
    last_lba = size // SECTOR - 1
    problems: list[str] = []
    for lba in (1, last_lba):
        offset = lba * SECTOR
        try:
            header = GPT_HEADER.parse(_read(data, offset, GPT_HEADER.sizeof()))
        except construct.ConstructError:
            problems.append(f"no GPT header at byte {offset}")
            continue
        if not 92 <= header.header_size <= SECTOR:
            problems.append(f"GPT header at byte {offset} claims a size of {header.header_size} bytes")
            continue
        raw = bytearray(_read(data, offset, header.header_size))
        raw[16:20] = b"\0\0\0\0"
        if zlib.crc32(raw) != header.header_crc32:
            problems.append(f"GPT header at byte {offset} fails its CRC32")
            continue
        # checked before the table is read: it is copied out of the disk whole
        if header.entry_size < 128 or header.entry_size % 8 or header.num_entries * header.entry_size > _MAX_GPT_TABLE:
            problems.append(f"GPT header at byte {offset} has a bad entry table geometry")
            continue
        table_offset = header.entries_lba * SECTOR
        table = _read(data, table_offset, header.num_entries * header.entry_size)
        if len(table) != header.num_entries * header.entry_size or zlib.crc32(table) != header.entries_crc32:
            problems.append(f"GPT entry table at byte {table_offset} fails its CRC32")
            continue
        return _gpt_entries(table, header.entry_size, size)
    raise FormatError(f"xray: protective MBR but no usable GPT: {'; '.join(problems)}")


def _gpt_entries(table: bytes, entry_size: int, size: int) -> list[Volume]:
    out: list[Volume] = []
    for index in range(len(table) // entry_size):
        entry = GPT_ENTRY.parse(table[index * entry_size : index * entry_size + GPT_ENTRY.sizeof()])
        if entry.type_guid == bytes(16):
            continue
        start, end = entry.first_lba * SECTOR, (entry.last_lba + 1) * SECTOR
        if end <= start or end > size:
            raise FormatError(
                f"xray: GPT partition {index + 1} ({entry.first_lba}-{entry.last_lba}) does not fit the disk"
            )
        name = entry.name.decode("utf-16-le", errors="replace").rstrip("\0")
        label = f"gpt {index + 1}" + (f" {name!r}" if name else "")
        out.append(Volume(label, start, end - start, _guid(entry.type_guid)))
    return out


def _guid(raw: bytes) -> str:
    """A GUID in its usual text form (the first three fields are little endian)."""
    a, b, c = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:6], "little"), int.from_bytes(raw[6:8], "little")
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"
