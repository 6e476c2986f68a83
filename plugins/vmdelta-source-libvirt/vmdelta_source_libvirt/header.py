"""Reads and checks a save image's header and data (domain XML, cookie, padding).

The header and data are kept byte for byte in the envelope; what is read from them here is
checked as libvirt would check it, and more strictly where libvirt would read past its buffer,
so that an image libvirt refuses is refused here too, with one line saying why.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from construct import ConstructError
from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from vmdelta_core.plugin import FormatError
from vmdelta_source_libvirt.c_libvirt import FORMATS, HEADER_SIZE, MAGIC, MAGIC_PARTIAL, SAVE_VERSION, header_schema

__all__ = ["MAX_DATA", "SaveHeader", "parse_prefix", "read_prefix"]

#: the most XML + cookie + padding a header may announce: libvirt's own images hold 64-70 KiB
MAX_DATA = 64 << 20


@attrs.frozen
class SaveHeader:
    """What a save image's header and data say."""

    version: int
    data_len: int
    was_running: bool
    #: the compression of the QEMU stream: ``raw``, ``gzip``, ``bzip2``, ``xz``, ``lzop``, ``zstd``
    compression: str
    little_endian: bool
    xml: str
    cookie: str | None
    domain: str
    uuid: str | None

    @property
    def stream_offset(self) -> int:
        """Where the QEMU stream (compressed or not) starts in the file."""
        return HEADER_SIZE + self.data_len

    def summary(self) -> dict[str, Any]:
        """The JSON-able description that goes into the overlay's layout."""
        return {
            "version": self.version,
            "byte_order": "little" if self.little_endian else "big",
            "was_running": self.was_running,
            "compression": self.compression,
            "domain": self.domain,
            "uuid": self.uuid,
            "xml_bytes": len(self.xml.encode()),
            "cookie_bytes": 0 if self.cookie is None else len(self.cookie.encode()),
            "data_len": self.data_len,
            "stream_offset": self.stream_offset,
        }


def read_prefix(fd: int, size: int, where: str) -> bytes:
    """The header and data of the save image open as ``fd`` (``size`` bytes), unchecked beyond
    what it takes to know their length; :func:`parse_prefix` checks them."""
    head = os.pread(fd, HEADER_SIZE, 0)
    fields, _ = _fields(head, where)
    data_len = fields.data_len
    if data_len > MAX_DATA:
        raise FormatError(f"{where}: the header announces {data_len} bytes of domain XML, more than {MAX_DATA}")
    if HEADER_SIZE + data_len > size:
        raise FormatError(
            f"{where}: the header announces {data_len} bytes of domain XML at offset {HEADER_SIZE}, "
            f"the file holds {size - HEADER_SIZE}"
        )
    return head + os.pread(fd, data_len, HEADER_SIZE)


def parse_prefix(prefix: bytes, where: str) -> SaveHeader:
    """Check the header and data (``prefix``: exactly ``92 + data_len`` bytes) and read the
    domain XML; one :class:`FormatError` line otherwise."""
    fields, little = _fields(prefix, where)
    data = prefix[HEADER_SIZE:]
    if fields.data_len != len(data):
        raise FormatError(f"{where}: the header announces {fields.data_len} bytes of domain XML, {len(data)} follow")
    if fields.data_len == 0:
        raise FormatError(f"{where}: the header announces no domain XML (data_len 0)")
    if fields.format not in FORMATS:
        raise FormatError(
            f"{where}: save image format {fields.format} at offset 28 is not one libvirt writes "
            f"({', '.join(f'{k} {v}' for k, v in FORMATS.items())})"
        )
    cookie_offset = fields.cookie_offset
    if cookie_offset > fields.data_len:
        raise FormatError(f"{where}: cookie offset {cookie_offset} lies past the {fields.data_len} bytes of data")
    xml_area = data[:cookie_offset] if cookie_offset else data
    xml = _c_string(xml_area, "domain XML", HEADER_SIZE, where)
    cookie = _c_string(data[cookie_offset:], "cookie", HEADER_SIZE + cookie_offset, where) if cookie_offset else None
    domain, uuid = _domain(xml, where)
    return SaveHeader(
        version=fields.version,
        data_len=fields.data_len,
        was_running=bool(fields.was_running),
        compression=FORMATS[fields.format],
        little_endian=little,
        xml=xml,
        cookie=cookie,
        domain=domain,
        uuid=uuid,
    )


def _fields(head: bytes, where: str) -> tuple[Any, bool]:
    """The header's fields in the byte order that gives a version libvirt knows, and whether
    that order is little-endian."""
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{where}: {len(head)} bytes, shorter than a libvirt save image header ({HEADER_SIZE})")
    magic = head[:16]
    if magic == MAGIC_PARTIAL:
        raise FormatError(
            f"{where}: the save image is incomplete (magic {MAGIC_PARTIAL.decode()}): libvirt never finished it"
        )
    if magic != MAGIC:
        raise FormatError(f"{where}: not a libvirt save image (no {MAGIC.decode()} magic at offset 0)")
    for little in (True, False):
        try:
            fields = header_schema(little).parse(head[:HEADER_SIZE])
        except ConstructError as exc:  # pragma: no cover - 92 bytes always parse
            raise FormatError(f"{where}: bad save image header: {exc}") from None
        if 1 <= fields.version <= SAVE_VERSION:
            return fields, little
    raise FormatError(
        f"{where}: save image version {int.from_bytes(head[16:20], 'little')} at offset 16; "
        f"versions 1 to {SAVE_VERSION} are known"
    )


def _c_string(area: bytes, what: str, offset: int, where: str) -> str:
    end = area.find(b"\0")
    if end < 0:
        raise FormatError(f"{where}: the {what} at offset {offset} has no terminating NUL byte")
    try:
        return area[:end].decode()
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: the {what} at offset {offset} is not UTF-8 (byte {exc.start})") from None


def _domain(xml: str, where: str) -> tuple[str, str | None]:
    """The domain's name and UUID; the XML must be a ``<domain>`` document."""
    try:
        root = ElementTree.fromstring(xml, forbid_dtd=True)
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{where}: the domain XML at offset {HEADER_SIZE} does not parse: {reason}") from None
    name = root.findtext("name")
    if root.tag != "domain" or not name:
        raise FormatError(f"{where}: the XML at offset {HEADER_SIZE} is not a libvirt domain with a name")
    return name, root.findtext("uuid")
