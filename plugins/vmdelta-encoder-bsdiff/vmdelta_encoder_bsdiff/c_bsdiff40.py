"""The BSDIFF40 patch format, as bsdiff4 and the original bsdiff write it.

::

    offset  size  field
    0       8     magic "BSDIFF40"
    8       8     length of the bzip2-compressed control block
    16      8     length of the bzip2-compressed diff block
    24      8     length of the new file (here: the unit)
    32      ...   bzip2(control) bzip2(diff) bzip2(extra), the extra block running to the end

The three sizes are "offtin" integers: 63-bit magnitude, little-endian, sign in the top bit. The
control block is a list of 24-byte (add, copy, seek) triples in the same encoding. ``HEADER`` is
the declarative definition; the per-unit path reads the same 32 bytes with :mod:`struct` (a
``construct`` parse costs more than the rest of a small unit's decode), and a test holds the two
together.
"""

from __future__ import annotations

import struct

from construct import Const, Int64ul, Struct

__all__ = ["HEADER", "HEADER_SIZE", "MAGIC", "pack_header", "unpack_header"]

MAGIC = b"BSDIFF40"
HEADER = Struct(
    "magic" / Const(MAGIC),
    # offtin: bit 63 is the sign; sizes are never negative, so it must be clear
    "control_length" / Int64ul,
    "diff_length" / Int64ul,
    "new_length" / Int64ul,
)
HEADER_SIZE = 32
_HEADER = struct.Struct("<8sQQQ")
_SIGN = 1 << 63


def pack_header(control_length: int, diff_length: int, new_length: int) -> bytes:
    return _HEADER.pack(MAGIC, control_length, diff_length, new_length)


def unpack_header(data: bytes) -> tuple[int, int, int]:
    """(control length, diff length, new length) of a patch.

    :raises ValueError: no BSDIFF40 magic, truncated, or a negative size.
    """
    if len(data) < HEADER_SIZE:
        raise ValueError(f"{len(data)} bytes are too short for a BSDIFF40 header")
    magic, control, diff, new = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("no BSDIFF40 magic")
    if (control | diff | new) & _SIGN:
        raise ValueError("negative size in the BSDIFF40 header")
    return control, diff, new
