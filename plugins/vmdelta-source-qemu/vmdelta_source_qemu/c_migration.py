"""QEMU migration stream structures as declarative ``construct`` schemas.

Definitions only: :mod:`vmdelta_source_qemu.stream` walks a stream section by section with these,
and :mod:`vmdelta_source_qemu.scan` reads the RAM records (one per page) on a fast path of its own
that the tests hold to :data:`RAM_RECORD` byte for byte. All integers are big-endian, as QEMU
writes them (``qemu_put_be32`` and friends), except the mapped-ram bitmap, which is host
``unsigned long`` words (little-endian on x86-64).
"""

from __future__ import annotations

import enum

from construct import (
    Bytes,
    Computed,
    Const,
    GreedyBytes,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    PrefixedArray,
    Struct,
)

__all__ = [
    "BLOCK_ENTRY",
    "CAPABILITIES",
    "COMMAND",
    "CONFIGURATION",
    "FILE_HEADER",
    "FOOTER",
    "KNOWN_CAPABILITIES",
    "MAPPED_RAM_HEADER",
    "PAGE_SIZE",
    "QEVM_MAGIC",
    "RAM_RECORD",
    "SECTION_FULL",
    "SECTION_PART",
    "STREAM_VERSION",
    "SUBSECTION_HEADER",
    "VMDESC_HEADER",
    "RamFlag",
    "SectionType",
    "block_entry",
]

QEVM_MAGIC = 0x5145564D
STREAM_VERSION = 3
#: TARGET_PAGE_SIZE on x86: the unit of every RAM record
PAGE_SIZE = 4096
#: capabilities QEMU announces in ``configuration/capabilities`` that this reader understands
KNOWN_CAPABILITIES = frozenset({"x-ignore-shared", "mapped-ram"})


class SectionType(enum.IntEnum):
    """The byte that opens every top-level element of a stream (``QEMU_VM_*``)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class RamFlag(enum.IntFlag):
    """Low 12 bits of a RAM record header (``RAM_SAVE_FLAG_*``); the high bits are an offset."""

    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


FILE_HEADER = Struct(
    "magic" / Const(QEVM_MAGIC, Int32ub),
    "version" / Int32ub,
)

#: ``QEMU_VM_CONFIGURATION``: the machine type; subsections may follow it
CONFIGURATION = Struct(
    "type" / Const(int(SectionType.CONFIGURATION), Int8ub),
    "machine" / PascalString(Int32ub, "latin-1"),
)

SUBSECTION_HEADER = Struct(
    "type" / Const(int(SectionType.SUBSECTION), Int8ub),
    "name" / PascalString(Int8ub, "latin-1"),
    "version" / Int32ub,
)

#: body of the ``configuration/capabilities`` subsection
CAPABILITIES = PrefixedArray(Int32ub, PascalString(Int8ub, "latin-1"))

#: START and FULL sections: the device is named
SECTION_FULL = Struct(
    "type" / Int8ub,
    "section_id" / Int32ub,
    "idstr" / PascalString(Int8ub, "latin-1"),
    "instance_id" / Int32ub,
    "version_id" / Int32ub,
)

#: PART and END sections refer to a START by id
SECTION_PART = Struct(
    "type" / Int8ub,
    "section_id" / Int32ub,
)

FOOTER = Struct(
    "type" / Const(int(SectionType.FOOTER), Int8ub),
    "section_id" / Int32ub,
)

COMMAND = Struct(
    "type" / Const(int(SectionType.COMMAND), Int8ub),
    "command" / Int16ub,
    "data" / Prefixed(Int16ub, GreedyBytes),
)

#: the trailing JSON description of the devices
VMDESC_HEADER = Struct(
    "type" / Const(int(SectionType.VMDESCRIPTION), Int8ub),
    "length" / Int32ub,
)


#: ``MappedRamHeader`` (QEMU 9.0+), packed
MAPPED_RAM_HEADER = Struct(
    "version" / Int32ub,
    "page_size" / Int64ub,
    "bitmap_offset" / Int64ub,
    "pages_offset" / Int64ub,
)


def block_entry(*, guest_address: bool, mapped_ram: bool) -> Struct:
    """One RAM block of the MEM_SIZE table; the stream does not say which fields are present,
    the capabilities do (``x-ignore-shared`` adds the guest address, ``mapped-ram`` a header)."""
    return Struct(
        "name" / PascalString(Int8ub, "latin-1"),
        "used_length" / Int64ub,
        "guest_address" / If(guest_address, Int64ub),
        "mapped" / If(mapped_ram, MAPPED_RAM_HEADER),
    )


BLOCK_ENTRY = block_entry(guest_address=False, mapped_ram=False)

#: one RAM record as QEMU's ``ram_load`` reads it; the scanner reads thousands of these a
#: millisecond without construct, and the tests compare the two
RAM_RECORD = Struct(
    "header" / Int64ub,
    "flags" / Computed(lambda ctx: ctx.header & 0xFFF),
    "offset" / Computed(lambda ctx: ctx.header & ~0xFFF),
    "name"
    / If(
        lambda ctx: not ctx.header & RamFlag.CONTINUE and ctx.header & (RamFlag.PAGE | RamFlag.ZERO),
        PascalString(Int8ub, "latin-1"),
    ),
    "fill" / If(lambda ctx: ctx.header & RamFlag.ZERO, Int8ub),
    "data" / If(lambda ctx: ctx.header & RamFlag.PAGE, Bytes(PAGE_SIZE)),
)
