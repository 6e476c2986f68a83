"""Wire formats of vmdelta as declarative ``construct`` schemas.

The DeltaItem record is byte-compatible with the item streams of the original VM-synthesis system
(big-endian u64 offset, u16 length, one byte of ``ref << 4 | type``, then what the ref needs).
Only definitions live here; :mod:`vmdelta_core.overlay.items` is the fast path that reads and writes many
items, and its tests hold it to these schemas byte for byte.
"""

from __future__ import annotations

import enum

from construct import (
    BitStruct,
    Bytes,
    Const,
    Enum,
    GreedyBytes,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Nibble,
    Pass,
    Prefixed,
    Struct,
    Switch,
    this,
)

from vmdelta_core.limits import MAX_UNIT, MIN_UNIT
from vmdelta_core.overlay.layout import OVERLAY_MAGIC

__all__ = [
    "BASE_REFS",
    "DELTA_ITEM",
    "DELTA_ITEM_WITH_HASH",
    "FIXED_VALUE_REFS",
    "FRAME_INDEX_ENTRY",
    "HEADER",
    "ITEM_TYPES",
    "LIVE_TYPES",
    "MAX_UNIT",
    "MIN_UNIT",
    "NON_PAYLOAD_REFS",
    "OVERLAY_MAGIC",
    "TRAILER",
    "TRAILER_MAGIC",
    "FrameKind",
    "ItemType",
    "Ref",
]


class ItemType(enum.IntEnum):
    """Low nibble of the info byte: which image the item rebuilds, and whether it is a live pass."""

    MEMORY = 0x1
    DISK = 0x2
    MEMORY_LIVE = 0x3
    DISK_LIVE = 0x4


class Ref(enum.IntEnum):
    """High nibble of the info byte: how the unit is rebuilt (value shown shifted down)."""

    RAW = 0x1
    XDELTA = 0x2
    SELF = 0x3
    BASE_DISK = 0x4
    BASE_MEM = 0x5
    ZEROS = 0x6
    BSDIFF = 0x7
    SELF_HASH = 0x8
    XOR = 0x9


#: refs whose record carries a single u64 (a base byte offset or an earlier item's address)
FIXED_VALUE_REFS = frozenset({Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM})
#: refs with no payload-length field; every other ref (including the free ids 0x0 and 0xA-0xF
#: handed to third-party encoders) carries a u64 length and that many payload bytes
NON_PAYLOAD_REFS = frozenset({Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM, Ref.SELF_HASH, Ref.ZEROS})
LIVE_TYPES = frozenset({ItemType.MEMORY_LIVE, ItemType.DISK_LIVE})
#: the ref that points into a base of each image kind
BASE_REFS = {"memory": Ref.BASE_MEM, "disk": Ref.BASE_DISK}
#: the item types of each image kind: its plain type first, then its live type
ITEM_TYPES = {"memory": (ItemType.MEMORY, ItemType.MEMORY_LIVE), "disk": (ItemType.DISK, ItemType.DISK_LIVE)}

_INFO = BitStruct("ref" / Nibble, "type" / Nibble)


def _delta_item(with_hash: bool) -> Struct:
    return Struct(
        "offset" / Int64ub,
        "length" / Int16ub,
        "info" / _INFO,
        "data"
        / Switch(
            this.info.ref,
            {
                Ref.SELF: Int64ub,
                Ref.BASE_DISK: Int64ub,
                Ref.BASE_MEM: Int64ub,
                Ref.SELF_HASH: Bytes(32),
                Ref.ZEROS: Pass,
            },
            default=Prefixed(Int64ub, GreedyBytes),
        ),
        "live_seq" / If(lambda ctx: ctx.info.type in LIVE_TYPES, Int16ub),
        *(["hash" / Bytes(32)] if with_hash else []),
    )


#: one DeltaItem as stored in overlays
DELTA_ITEM = _delta_item(with_hash=False)
#: the "residue" variant of the original system, with the SHA-256 of the unit after each record
DELTA_ITEM_WITH_HASH = _delta_item(with_hash=True)

# --------------------------------------------------------------------------------------------
# overlay container v1 (schemas/overlay-v1.md)
# --------------------------------------------------------------------------------------------

TRAILER_MAGIC = b"VMDLTEND"

#: the first 16 bytes of an overlay
HEADER = Struct(
    "magic" / Const(OVERLAY_MAGIC),
    "version" / Int16ub,
    "flags" / Int16ub,
    "reserved" / Int32ub,
)

FrameKind = Enum(Int8ub, items=0, envelope=1)

#: one entry of the frame index (48 bytes)
FRAME_INDEX_ENTRY = Struct(
    "file_offset" / Int64ub,
    "stored_length" / Int32ub,
    "length" / Int32ub,
    "image" / Int16ub,
    "kind" / FrameKind,
    "codec" / Int8ub,
    "item_count" / Int32ub,
    "first_offset" / Int64ub,
    "end_offset" / Int64ub,
    "checksum" / Int64ub,
)

#: the last 64 bytes of an overlay; ``file_checksum`` covers every byte before it
TRAILER = Struct(
    "metadata_offset" / Int64ub,
    "metadata_length" / Int64ub,
    "metadata_checksum" / Int64ub,
    "index_offset" / Int64ub,
    "index_count" / Int64ub,
    "index_checksum" / Int64ub,
    "file_checksum" / Int64ub,
    "magic" / Const(TRAILER_MAGIC),
)
