"""The qcow2 on-disk format as construct schemas (QEMU's docs/interop/qcow2.txt).

Binary definitions only; reading and writing logic lives in :mod:`.qcow2` and :mod:`.qcow2_writer`.
Tables (L1, L2, refcount blocks) are schemas too, but they decode to numpy arrays in one call
rather than to one Python object per entry: a 100 GiB image has 1.6 million L2 entries. The bit
layouts of single entries are given as ``BitStruct`` schemas; the numpy masks used on whole
tables are derived from the same widths, and a test checks that the two agree.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from construct import (
    Adapter,
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    Construct,
    Flag,
    GreedyBytes,
    If,
    Int8ub,
    Int32ub,
    Int64ub,
    Padding,
    RepeatUntil,
    Struct,
    this,
)

__all__ = [
    "COMPRESSION_TYPES",
    "EXTENSION_HEAD",
    "EXT_BACKING_FORMAT",
    "EXT_END",
    "EXT_FEATURE_NAMES",
    "FEATURE_NAME_TABLE",
    "INCOMPAT_KNOWN",
    "L1_OFFSET_MASK",
    "L2_COMPRESSED",
    "L2_COPIED",
    "L2_OFFSET_MASK",
    "L2_ZERO",
    "MAGIC",
    "FeatureNameEntry",
    "HeaderExtensions",
    "L1Entry",
    "L2StandardEntry",
    "Qcow2Header",
    "Table",
    "compressed_descriptor",
    "compressed_fields",
]

MAGIC = b"QFI\xfb"

#: header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

#: incompatible feature bits and what they mean
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = {
    0: "dirty",
    1: "corrupt",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

# --------------------------------------------------------------------------------------------
# header
# --------------------------------------------------------------------------------------------

#: fields that version 3 adds after the 72 bytes of version 2
_HeaderV3 = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
    # QEMU 5.1+: one byte after the 104 bytes of the original v3 header, padded to 112
    "compression_type" / If(this.header_length >= 105, Int8ub),
    Padding(lambda ctx: max(0, ctx.header_length - (105 if ctx.header_length >= 105 else 104))),
)

Qcow2Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    "v3" / If(this.version >= 3, _HeaderV3),
)

HeaderExtension = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
    "data" / Bytes(this.length),
    Padding(lambda ctx: -ctx.length % 8),
)

#: the extensions follow the header, up to and including the end marker
HeaderExtensions = RepeatUntil(lambda obj, lst, ctx: obj["type"] == EXT_END, HeaderExtension)

#: the fixed start of a :data:`HeaderExtension` (type, length), for walking many of them fast: a
#: damaged header cluster of 2 MiB may hold 262144 of them
EXTENSION_HEAD = struct.Struct(">II")

#: the feature name table extension as a whole, one record per 48 bytes
FEATURE_NAME_TABLE = np.dtype([("type", "u1"), ("bit", "u1"), ("name", "S46")])

#: one entry of the feature name table extension
FeatureNameEntry = Struct(
    "type" / Int8ub,  # 0 incompatible, 1 compatible, 2 autoclear
    "bit" / Int8ub,
    "name" / Bytes(46),  # ASCII, zero padded; decoded leniently by the reader
)

FeatureNameTable = Struct("entries" / GreedyBytes)

# --------------------------------------------------------------------------------------------
# table entries (bit 63 first)
# --------------------------------------------------------------------------------------------

L1Entry = BitStruct(
    "copied" / Flag,
    "reserved_high" / BitsInteger(7),
    "l2_offset_clusters" / BitsInteger(47),  # bits 9..55: offset >> 9
    "reserved_low" / BitsInteger(9),
)

L2StandardEntry = BitStruct(
    "copied" / Flag,
    "compressed" / Flag,  # 0 for a standard cluster
    "reserved_high" / BitsInteger(6),
    "host_offset_sectors" / BitsInteger(47),  # bits 9..55: offset >> 9
    "reserved_low" / BitsInteger(8),
    "zero" / Flag,  # reads as zeros (version 3)
)


def compressed_descriptor(cluster_bits: int) -> Construct:
    """The L2 entry of a compressed cluster: bit 62 set, then sector count and host offset.

    With ``x = 62 - (cluster_bits - 8)``, bits ``0..x-1`` hold the host byte offset of the
    compressed data and bits ``x..61`` the number of additional 512-byte sectors it spans.
    """
    x = compressed_fields(cluster_bits)[0]
    return BitStruct(
        "copied" / Flag,
        "compressed" / Flag,
        "additional_sectors" / BitsInteger(62 - x),
        "host_offset" / BitsInteger(x),
    )


def compressed_fields(cluster_bits: int) -> tuple[int, int]:
    """(bit position of the sector count, mask of the sector count after shifting)."""
    x = 62 - (cluster_bits - 8)
    return x, (1 << (62 - x)) - 1


L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_COPIED = 1 << 63
L2_COMPRESSED = 1 << 62
L2_ZERO = 1
#: bits that must be zero in an L1 entry / a standard L2 entry
L1_RESERVED = 0x7F000000000001FF
L2_STANDARD_RESERVED = 0x3F000000000001FE


# --------------------------------------------------------------------------------------------
# whole tables
# --------------------------------------------------------------------------------------------


class _TableAdapter(Adapter):  # type: ignore[misc]
    """A big-endian table decoded to (and built from) a numpy array in one step."""

    def __init__(self, subcon: Construct, dtype: str) -> None:
        super().__init__(subcon)
        self.dtype = np.dtype(dtype)

    def _decode(self, obj: bytes, context: Any, path: str) -> np.ndarray:
        return np.frombuffer(obj, dtype=self.dtype).astype(self.dtype.newbyteorder("="))

    def _encode(self, obj: Any, context: Any, path: str) -> bytes:
        return np.asarray(obj).astype(self.dtype).tobytes()


def Table(count: int, dtype: str = ">u8") -> Construct:
    """``count`` big-endian entries (L1/L2: ``>u8``; refcount blocks of order 4: ``>u2``)."""
    return _TableAdapter(Bytes(count * np.dtype(dtype).itemsize), dtype)
