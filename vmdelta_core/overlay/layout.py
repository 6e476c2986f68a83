"""The container's fixed fields as plain :mod:`struct` (``schemas/overlay-v1.md``): what a program
needs to tell the two forms apart and find a stream's prologue without importing the format's
readers (construct, numpy). ``vmdelta send`` relays a stream-form overlay with no more than this.
"""

from __future__ import annotations

import struct

from vmdelta_core.errors import FormatError

__all__ = [
    "CHECKSUM_FIELD",
    "FLAG_STREAM",
    "FORMAT_VERSION",
    "HEADER_FIELDS",
    "HEADER_SIZE",
    "LENGTH_FIELD",
    "MAX_METADATA",
    "OVERLAY_MAGIC",
    "read_header",
]

OVERLAY_MAGIC = b"\x89VMDELTA"
FORMAT_VERSION = 1
#: magic, version, flags, reserved
HEADER_FIELDS = struct.Struct("!8sHHI")
HEADER_SIZE = HEADER_FIELDS.size
#: header flag of the stream form (``schemas/overlay-v1-stream.md``): prologue first, each frame
#: headed by its index entry, so a reader needs no seeking
FLAG_STREAM = 0x1
#: no metadata document (prologue or whole) may be larger (untrusted input)
MAX_METADATA = 64 << 20
#: the length before a prologue or an epilogue, and the checksum after a prologue
LENGTH_FIELD = struct.Struct("!I")
CHECKSUM_FIELD = struct.Struct("!Q")


def read_header(head: bytes, name: str) -> bool:
    """Whether the overlay whose first :data:`HEADER_SIZE` bytes are ``head`` is in the stream form.

    :raises FormatError: ``head`` is not the header of an overlay this version reads.
    """
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{name}: too short to be an overlay ({len(head)} bytes)")
    magic, version, flags, reserved = HEADER_FIELDS.unpack(head[:HEADER_SIZE])
    if magic != OVERLAY_MAGIC:
        raise FormatError(f"{name}: not a vmdelta overlay (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(f"{name}: overlay format version {version}; this vmdelta reads {FORMAT_VERSION}")
    if flags & ~FLAG_STREAM or reserved:
        raise FormatError(f"{name}: overlay header has unknown flags set ({flags:#x})")
    return bool(flags & FLAG_STREAM)
