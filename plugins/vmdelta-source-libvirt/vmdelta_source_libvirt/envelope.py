"""The envelope of a save image: its header and data byte for byte, then the QEMU stream's.

Wire form: magic ``LVSAVE01``, u32 (big-endian) length + the header and data (``92 + data_len``
bytes, domain XML, cookie and padding included), u32 length + the head of the compressed stream
that its program writes differently each run (lzop's file header with its time; empty for the
others), then the ``qemu`` source's envelope to the end.
Two saves of one domain have nearly the same XML and device state, so the envelope compresses
well against the base's, as the core stores it.
"""

from __future__ import annotations

import struct

import attrs

from vmdelta_core.plugin import FormatError
from vmdelta_source_libvirt.header import MAX_DATA, SaveHeader, parse_prefix

__all__ = ["SaveEnvelope", "pack_envelope", "unpack_envelope"]

MAGIC = b"LVSAVE01"
_U32 = struct.Struct(">I")


@attrs.frozen
class SaveEnvelope:
    prefix: bytes
    header: SaveHeader
    #: the compressed stream's leading bytes that its program writes differently each run
    head: bytes
    stream: bytes


def pack_envelope(prefix: bytes, head: bytes, stream_envelope: bytes) -> bytes:
    return MAGIC + _U32.pack(len(prefix)) + prefix + _U32.pack(len(head)) + head + stream_envelope


def unpack_envelope(envelope: bytes) -> SaveEnvelope:
    """The envelope's parts, the header checked; it comes from an overlay, so every length is
    checked before it is used."""
    if envelope[: len(MAGIC)] != MAGIC:
        raise FormatError("libvirt envelope: no LVSAVE01 magic")
    pos = len(MAGIC)
    prefix, pos = _field(envelope, pos, MAX_DATA + 92, "header")
    head, pos = _field(envelope, pos, 1024, "compressed stream head")
    return SaveEnvelope(prefix, parse_prefix(prefix, "libvirt envelope"), head, envelope[pos:])


def _field(envelope: bytes, pos: int, most: int, what: str) -> tuple[bytes, int]:
    if pos + _U32.size > len(envelope):
        raise FormatError(f"libvirt envelope: cut short before its {what}")
    (length,) = _U32.unpack_from(envelope, pos)
    pos += _U32.size
    if length > most or pos + length > len(envelope):
        raise FormatError(f"libvirt envelope: a {what} of {length} bytes in an envelope of {len(envelope)}")
    return envelope[pos : pos + length], pos + length
