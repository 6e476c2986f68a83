"""The end of a migration stream: device sections, the EOF byte and the VM description.

QEMU ends a stream with its device sections (FULL), an EOF byte (``QEMU_VM_EOF``, 0x00) and the
VM description: a VMDESCRIPTION byte, a be32 length and that many bytes of JSON, which list each
device section (``name`` = the section's idstr, ``instance_id``) in the order they were saved.
Device sections cannot be parsed without QEMU's device models, and a zero byte is common in them,
so a stream cut inside them after a zero byte looks like one that ends there. The description
decides it: it must end the file exactly and be valid JSON, and the device sections from the end
of the RAM section must be the ones it lists, in its order, the last one's footer right before
the EOF byte. A stream with no description (``-machine suppress-vmdesc=on``) cannot be told from
a cut one and is refused; QEMU writes one otherwise, 7.2 and 10.x alike.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import attrs

from vmdelta_core.plugin import FormatError
from vmdelta_source_qemu.c_migration import SectionType

__all__ = ["DESCRIPTION_MAX", "VmDescription", "find_description", "walk_devices"]

#: the largest VM description read (a 128 MiB pc guest's is about 100 KiB)
DESCRIPTION_MAX = 16 << 20
#: bytes copied out of the stream at a time while searching it
_WINDOW = 1 << 16
_BE32 = struct.Struct(">I")
_EOF = int(SectionType.EOF)
_FULL = int(SectionType.FULL)
_VMDESC = int(SectionType.VMDESCRIPTION)
_FOOTER = int(SectionType.FOOTER)


@attrs.frozen
class VmDescription:
    """What a stream's end says: where its EOF byte is and which device sections come before it."""

    #: offset of the EOF byte; the description follows it to the end of the file
    eof: int
    #: ``(idstr, instance id)`` of every device section, in stream order
    devices: tuple[tuple[str, int], ...]
    page_size: int | None = None


def find_description(view: memoryview, size: int, start: int) -> VmDescription:
    """The EOF byte and the VM description that end the stream in ``view[:size]``.

    :param start: the first offset the EOF byte may have (the end of the stream header).
    :raises FormatError: naming the offset where the stream stops being what QEMU writes.
    """
    floor = max(start, size - DESCRIPTION_MAX - 6)
    eof = _eof_before(view, floor, size)
    if eof < 0:
        raise FormatError(_bad_end(view, floor, size))
    return _parse(view, eof, size)


def _eof_before(view: memoryview, floor: int, size: int) -> int:
    """The offset of an EOF byte whose VM description ends exactly at ``size``, or -1.

    JSON holds no NUL byte, so the EOF byte is one of the six bytes up to the last zero byte (the
    description's length may hold zeros): only those are tried.
    """
    last = _rfind_zero(view, floor, size)
    for eof in range(max(last - 5, floor), last + 1) if last >= 0 else ():
        if view[eof] == _EOF and eof + 6 <= size and view[eof + 1] == _VMDESC:
            (length,) = _BE32.unpack_from(view, eof + 2)
            if eof + 6 + length == size:
                return eof
    return -1


def _rfind_zero(view: memoryview, floor: int, stop: int, zero: bool = True) -> int:
    """Offset of the last zero byte (``zero``) or non-zero byte in ``view[floor:stop]``, or -1;
    read backwards a window at a time, small at first."""
    window = 1 << 10
    while stop > floor:
        lo = max(floor, stop - window)
        chunk = bytes(view[lo:stop])
        at = chunk.rfind(b"\0") if zero else len(chunk.rstrip(b"\0")) - 1
        if at >= 0:
            return lo + at
        stop, window = lo, min(window * 4, _WINDOW)
    return -1


def _device_hook(obj: dict[str, Any]) -> Any:
    """Keep only what the walk needs, as the decoder builds it: the description of each field of
    each device would otherwise all be held at once."""
    if "devices" in obj:
        return obj
    if "instance_id" in obj:
        return (obj.get("name"), obj.get("instance_id"))
    return None


def _parse(view: memoryview, eof: int, size: int) -> VmDescription:
    at = eof + 6
    try:
        top = json.loads(bytes(view[at:size]), object_hook=_device_hook)
    except (ValueError, RecursionError):
        raise FormatError(f"the VM description at offset {at} is not valid JSON") from None
    devices = top.get("devices") if isinstance(top, dict) else None
    if not isinstance(devices, list) or not all(
        isinstance(d, tuple)
        and isinstance(d[0], str)
        and isinstance(d[1], int)
        and not isinstance(d[1], bool)
        and 0 <= d[1] < 1 << 32
        for d in devices
    ):
        raise FormatError(
            f"the VM description at offset {at} does not list the device sections (a name and an instance_id each)"
        )
    page_size = top.get("page_size")
    return VmDescription(eof, tuple(devices), page_size if isinstance(page_size, int) else None)


def _bad_end(view: memoryview, floor: int, size: int) -> str:
    """What is wrong with the end of a stream that does not end in a VM description."""
    last = _rfind_zero(view, floor, size)
    if last == size - 1:
        end = _rfind_zero(view, floor, size, zero=False) + 1
        if end > floor and _eof_before(view, floor, end) >= 0:
            return f"{size - end} zero bytes after the end of the stream at offset {end} (after its VM description)"
        return (
            f"stream truncated at offset {size}: no VM description follows its last zero byte (a cut stream, or one "
            "saved with -machine suppress-vmdesc=on, whose end cannot be checked)"
        )
    for eof in range(max(last - 5, floor), last + 1) if last >= 0 else ():
        if view[eof] != _EOF or eof + 7 > size or view[eof + 1] != _VMDESC or view[eof + 6] != ord("{"):
            continue
        (length,) = _BE32.unpack_from(view, eof + 2)
        end = eof + 6 + length
        if end > size:
            return (
                f"stream truncated at offset {size}: the VM description at offset {eof + 6} is {length} bytes, "
                f"the file holds {size - eof - 6} of them"
            )
        try:
            json.loads(bytes(view[eof + 6 : end]), object_hook=_device_hook)
        except (ValueError, RecursionError):
            break
        return f"{size - end} bytes after the end of the stream at offset {end} (after its VM description)"
    return f"stream truncated or damaged at offset {size}: it does not end with an EOF byte and a VM description"


def walk_devices(view: memoryview, pos: int, description: VmDescription, taken: set[int]) -> None:
    """Check that the device sections from ``pos`` are the ones ``description`` lists, in its
    order, and that the last one's footer is right before its EOF byte.

    A section's payload is opaque; it ends at the first footer with its section id that the next
    listed section's header follows (or, for the last, at the EOF byte).

    :param taken: section ids already used (RAM's); device sections add theirs.
    """
    eof = description.eof
    devices = description.devices
    if not devices and pos != eof:
        raise _unexpected(view, pos, eof, "the EOF byte (the VM description lists no device)")
    for k, (name, instance) in enumerate(devices):
        header = _header(name, instance)
        if pos + 5 + len(header) > eof or view[pos] != _FULL or bytes(view[pos + 5 : pos + 5 + len(header)]) != header:
            raise _unexpected(view, pos, eof, f"the section of device {name!r} instance {instance}")
        (section_id,) = _BE32.unpack_from(view, pos + 1)
        if section_id in taken:
            raise FormatError(f"device section {name!r} at offset {pos} reuses section id {section_id}")
        taken.add(section_id)
        footer = bytes([_FOOTER]) + _BE32.pack(section_id)
        payload = pos + 5 + len(header) + 4  # version id
        if k + 1 < len(devices):
            follows = _header(*devices[k + 1])
            end = next(
                (
                    at
                    for at in _occurrences(view, footer + bytes([_FULL]), payload, eof)
                    if bytes(view[at + 10 : at + 10 + len(follows)]) == follows
                ),
                -1,
            )
            if end < 0:
                raise FormatError(
                    f"device section {name!r} at offset {pos} has no footer followed by the section of "
                    f"{devices[k + 1][0]!r} before the EOF byte at offset {eof}: the device state is damaged"
                )
            pos = end + 5
        else:
            if eof - 5 < payload or bytes(view[eof - 5 : eof]) != footer:
                raise FormatError(
                    f"the last device section ({name!r} at offset {pos}) does not end with its footer right before "
                    f"the EOF byte at offset {eof}: the stream is cut or damaged there"
                )
            pos = eof


def _header(name: str, instance: int) -> bytes:
    """A section header from its idstr on: length, idstr, instance id (section id and version
    id are not in the description)."""
    try:
        raw = name.encode("latin-1")
    except UnicodeEncodeError:
        raw = b""
    if not 0 < len(raw) < 256:
        raise FormatError(f"the VM description names device {name!r}, which no section header can name")
    return bytes([len(raw)]) + raw + _BE32.pack(instance)


def _unexpected(view: memoryview, pos: int, eof: int, expected: str) -> FormatError:
    if pos >= eof:
        return FormatError(f"the EOF byte at offset {eof} comes where {expected} should be")
    kind = view[pos]
    if kind not in (_FULL, _EOF):
        return FormatError(f"unknown section type {kind:#04x} at offset {pos} after the RAM section")
    return FormatError(f"offset {pos} after the RAM section: expected {expected}, as the VM description says")


def _occurrences(view: memoryview, needle: bytes, start: int, stop: int) -> Iterator[int]:
    """Offsets of ``needle`` in ``view[start:stop]``, in order, reading a window at a time (small
    at first: most device sections are a few hundred bytes)."""
    overlap = len(needle) - 1
    lo, window = start, 1 << 10
    while lo + len(needle) <= stop:
        hi = min(stop, lo + window + overlap)
        chunk = bytes(view[lo:hi])
        at = chunk.find(needle)
        while at >= 0:
            yield lo + at
            at = chunk.find(needle, at + 1)
        lo, window = hi - overlap, min(window * 4, _WINDOW)
