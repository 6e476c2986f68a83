"""The VCDIFF container (RFC 3284, with xdelta3's extensions), walked before decoding.

xdelta3's decoder trusts the sizes a window declares and allocates a target buffer of up to
64 MiB for it; an overlay is untrusted input, so every payload is walked here first and refused
unless its windows add up to exactly the unit it claims to rebuild and only use the features the
encoder emits. This runs once per unit, so it is plain integer parsing, not a ``construct``
schema (one of those costs tens of microseconds per call).

Layout::

    header   D6 C3 C4 00, hdr_indicator, [secondary id], [code table], [app header: varint n, n bytes]
    window   win_indicator, [source length, source position], delta length,
             target length, delta_indicator, data length, inst length, addr length,
             [adler32: 4 bytes], data, inst, addr

Integers are big-endian base-128 varints (RFC 3284 section 2).
"""

from __future__ import annotations

__all__ = ["VCDIFF_MAGIC", "VcdiffError", "check_payload"]

VCDIFF_MAGIC = b"\xd6\xc3\xc4\x00"

# hdr_indicator bits
VCD_SECONDARY = 0x01
VCD_CODETABLE = 0x02
VCD_APPHEADER = 0x04
# win_indicator bits
VCD_SOURCE = 0x01
VCD_TARGET = 0x02
VCD_ADLER32 = 0x04  # xdelta3 extension: a checksum of the target window

_MAX_VARINT_BYTES = 5  # 35 bits: far beyond any unit, and keeps a hostile varint short


class VcdiffError(ValueError):
    """A payload is not a VCDIFF delta this encoder can decode safely; the message says why."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise VcdiffError(f"truncated integer at byte {pos}")
        byte = data[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos + i + 1
    raise VcdiffError(f"integer at byte {pos} is longer than {_MAX_VARINT_BYTES} bytes")


def check_payload(data: bytes, source_length: int, target_length: int) -> None:
    """Refuse a payload unless its windows rebuild exactly ``target_length`` bytes.

    :raises VcdiffError: with the byte position inside the payload and what is wrong there.
    """
    if data[:4] != VCDIFF_MAGIC:
        raise VcdiffError("no VCDIFF header")
    if len(data) < 5:
        raise VcdiffError("truncated VCDIFF header")
    indicator = data[4]
    if indicator & ~VCD_APPHEADER:
        raise VcdiffError(f"header indicator {indicator:#x}: secondary compression and code tables are not accepted")
    pos = 5
    if indicator & VCD_APPHEADER:
        size, pos = _varint(data, pos)
        pos += size
        if pos > len(data):
            raise VcdiffError("application header runs past the end")
    produced = 0
    while pos < len(data):
        start = pos
        window = data[pos]
        pos += 1
        if window & ~(VCD_SOURCE | VCD_TARGET | VCD_ADLER32) or (window & VCD_SOURCE and window & VCD_TARGET):
            raise VcdiffError(f"window indicator {window:#x} at byte {start} is invalid")
        if window & VCD_SOURCE:
            seg_length, pos = _varint(data, pos)
            seg_position, pos = _varint(data, pos)
            if seg_position + seg_length > source_length:
                raise VcdiffError(f"window at byte {start} copies from beyond the {source_length}-byte base")
        elif window & VCD_TARGET:
            seg_length, pos = _varint(data, pos)
            seg_position, pos = _varint(data, pos)
            if seg_position + seg_length > produced:
                raise VcdiffError(f"window at byte {start} copies from target bytes not yet produced")
        delta_length, pos = _varint(data, pos)
        end = pos + delta_length
        if end > len(data):
            raise VcdiffError(f"window at byte {start} runs past the end of the payload")
        window_length, pos = _varint(data, pos)
        produced += window_length
        if produced > target_length:
            raise VcdiffError(f"windows rebuild more than the {target_length}-byte unit")
        if pos >= end or data[pos] != 0:
            raise VcdiffError(f"window at byte {start} uses secondary compression or is truncated")
        pos += 1
        sections = 0
        for _ in range(3):
            size, pos = _varint(data, pos)
            sections += size
        if window & VCD_ADLER32:
            pos += 4
        if pos + sections != end:
            raise VcdiffError(f"window at byte {start}: its sections do not add up to its length")
        pos = end
    if produced != target_length:
        raise VcdiffError(f"windows rebuild {produced} bytes, not the {target_length}-byte unit")
