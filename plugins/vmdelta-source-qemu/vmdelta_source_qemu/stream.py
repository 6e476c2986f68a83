"""Walks a QEMU migration stream (QEVM v3, QEMU 7.2-10.x) into blocks, records and regions.

Headers, sections and the block table are read with the construct schemas of
:mod:`~vmdelta_source_qemu.c_migration`; the records inside RAM sections go to the fast
:class:`~vmdelta_source_qemu.scan.RecordScanner`. Device sections cannot be walked without the
device models QEMU has, and need not be: a stopped-VM save writes every RAM section (START,
PART..., END) before the first device section (FULL), so everything from there to the end of the
file is kept as it is. The end of the stream is checked first (:mod:`~vmdelta_source_qemu.vmdesc`):
a file that does not end as QEMU ends a stream is refused before any page is read, and the device
sections are then checked against the VM description.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import attrs
import numpy as np
from construct import Construct, ConstructError

from vmdelta_core.plugin import FormatError
from vmdelta_source_qemu import c_migration as c
from vmdelta_source_qemu.blocks import MappedBlock, RamBlock, image_size, place_blocks
from vmdelta_source_qemu.c_migration import PAGE_SIZE, RamFlag, SectionType
from vmdelta_source_qemu.imagefile import ImageFile
from vmdelta_source_qemu.scan import RecordScanner, RecordTable
from vmdelta_source_qemu.vmdesc import VmDescription, find_description, walk_devices

__all__ = [
    "DEFAULT_MAX_RAM",
    "MAX_BLOCKS",
    "ParsedStream",
    "check_capabilities",
    "check_page_bits",
    "check_ram_claim",
    "check_ram_start",
    "parse_stream",
]

#: the most RAM a block table may claim unless the ``max_ram`` option says otherwise: 1 TiB, all
#: the physical address space of QEMU's default x86 CPU models (40 bits)
DEFAULT_MAX_RAM = 1 << 40
_MAPPED_ALIGN = 1 << 20
MAX_BLOCKS = 4096


@attrs.define(eq=False)
class ParsedStream:
    """What the walk found; the image holds every page the stream holds (for mapped-ram: none yet,
    the caller copies them in)."""

    fmt: str
    machine: str
    capabilities: list[str]
    blocks: list[RamBlock]
    image: ImageFile
    #: every ZERO/PAGE record, ``final`` set
    table: RecordTable
    size: int
    flushes: int
    rewritten: bool
    description: VmDescription
    #: offset of the first device section (after the RAM END section)
    devices_at: int

    @property
    def ignore_shared(self) -> bool:
        return "x-ignore-shared" in self.capabilities


def parse_stream(
    buf: np.ndarray, mapping: Any = None, tmpdir: str | None = None, max_ram: int = DEFAULT_MAX_RAM
) -> ParsedStream:
    """Read a whole stream held in ``buf`` (a ``uint8`` array, usually a view of ``mapping``, a
    read-only map of the file, whose pages are released as they are read). The image file goes
    to ``tmpdir`` (default: the system's temporary folder); the caller closes it on error too.
    A block table claiming more than ``max_ram`` bytes is refused before anything is made for it."""
    walker = _Walker(buf, mapping, tmpdir, max_ram)
    try:
        return walker.run()
    except BaseException:
        if walker.scanner is not None:
            walker.scanner.image.close()
        raise


def check_capabilities(caps: list[str], at: int) -> list[str]:
    """The capabilities a stream announces (``at``: the offset after the list), if all are known."""
    unknown = sorted(set(caps) - c.KNOWN_CAPABILITIES)
    if unknown:
        raise FormatError(
            f"stream announces capability {unknown[0]!r} (offset {at}), which changes its format in a "
            "way this reader does not know: save with it off"
        )
    return list(caps)


def check_page_bits(bits: int, at: int) -> None:
    """The ``configuration/target-page-bits`` value at offset ``at`` (a shift, never computed for
    a hostile one)."""
    if bits >= 64 or 1 << bits != PAGE_SIZE:
        raise FormatError(f"target page bits {bits} at offset {at}; only {PAGE_SIZE}-byte pages are supported")


def check_ram_start(head: Any, at: int, ram_id: int | None) -> None:
    """A START section's header at ``at``: RAM, the only iterative section known, once, version 4
    (``ram_id``: the RAM section found before, if any)."""
    if head.idstr != "ram":
        raise FormatError(
            f"iterative section {head.idstr!r} at offset {at}: only RAM may be saved iteratively here; "
            "turn off the capability that adds it (block, dirty-bitmaps, a VFIO device's state)"
        )
    if ram_id is not None:
        raise FormatError(f"a second RAM START section at offset {at}")
    if head.version_id != 4:
        raise FormatError(f"RAM section version {head.version_id} at offset {at}; only version 4 is known")


def check_ram_claim(total: int, at: int, max_ram: int) -> None:
    """The RAM a block table at ``at`` claims, refused past ``max_ram`` before anything is made for it."""
    if total > max_ram:
        raise FormatError(
            f"RAM block table at offset {at} claims {total} bytes of RAM, more than max_ram "
            f"({max_ram}); if the VM has that much, raise the qemu source's max_ram option"
        )


class _Walker:
    def __init__(self, buf: np.ndarray, mapping: Any, tmpdir: str | None, max_ram: int) -> None:
        self.buf = buf
        self.mapping = mapping
        self.tmpdir = tmpdir
        self.max_ram = max_ram
        self.view = memoryview(buf)  # type: ignore[arg-type]
        self.size = int(buf.shape[0])
        self.capabilities: list[str] = []
        self.blocks: list[RamBlock] = []
        self.scanner: RecordScanner | None = None
        self.ram_id: int | None = None
        self.ram_done = False

    # -- helpers -------------------------------------------------------------------------------

    def parse(self, schema: Construct, pos: int, what: str, limit: int = 1 << 16) -> tuple[Any, int]:
        """Parse ``schema`` at ``pos``; returns the value and the offset after it."""
        chunk = io.BytesIO(bytes(self.view[pos : pos + limit]))
        try:
            value = schema.parse_stream(chunk)
        except ConstructError as exc:
            if pos + chunk.tell() >= self.size or "stream read less than specified" in str(exc):
                raise FormatError(f"stream truncated in the {what} at offset {pos}") from None
            # construct's message spans lines: the field's path, then what went wrong
            field = str(getattr(exc, "path", None) or "").split(" -> ")[-1]
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise FormatError(f"bad {what} at offset {pos}: field {field or '?'}: {reason}") from None
        return value, pos + chunk.tell()

    def byte(self, pos: int, what: str) -> int:
        if pos >= self.size:
            raise FormatError(f"stream truncated at offset {pos}: expected {what}")
        return int(self.view[pos])

    # -- the walk ------------------------------------------------------------------------------

    def run(self) -> ParsedStream:
        if self.size < 8 or bytes(self.view[:4]) != b"QEVM":
            raise FormatError("not a QEMU migration stream: no QEVM magic at offset 0")
        header, pos = self.parse(c.FILE_HEADER, 0, "file header")
        if header.version != c.STREAM_VERSION:
            raise FormatError(
                f"QEMU migration stream version {header.version} at offset 4; "
                f"only version {c.STREAM_VERSION} is supported"
            )
        # a cut or padded file is refused before any page is read; sections end at the EOF byte
        description = find_description(self.view, self.size, pos)
        whole = self.view
        self.size = description.eof
        self.buf = self.buf[: self.size]
        self.view = memoryview(self.buf)  # type: ignore[arg-type]
        machine = ""
        if self.byte(pos, "a section") == SectionType.CONFIGURATION:
            config, pos = self.parse(c.CONFIGURATION, pos, "configuration section")
            machine = config.machine
            pos = self.subsections(pos)
        while not self.ram_done:
            pos = self.section(pos)
        if self.scanner is None:
            raise FormatError("stream has no RAM section")
        assert self.ram_id is not None
        walk_devices(whole, pos, description, {self.ram_id})
        scanner = self.scanner
        table = scanner.finish()
        mapped = "mapped-ram" in self.capabilities
        if scanner.flushes and not mapped:
            raise FormatError(
                "stream has MULTIFD_FLUSH records: its pages travelled on multifd channels this file does not "
                "hold; save with the multifd capability off (or use mapped-ram with a file: URI)"
            )
        return ParsedStream(
            fmt="mapped-ram" if mapped else "stream",
            machine=machine,
            capabilities=self.capabilities,
            blocks=self.blocks,
            image=scanner.image,
            table=table,
            size=len(whole),
            flushes=scanner.flushes,
            rewritten=scanner.rewritten,
            description=description,
            devices_at=pos,
        )

    def subsections(self, pos: int) -> int:
        while pos < self.size and self.view[pos] == SectionType.SUBSECTION:
            sub, pos = self.parse(c.SUBSECTION_HEADER, pos, "configuration subsection")
            if sub.name == "configuration/capabilities":
                caps, pos = self.parse(c.CAPABILITIES, pos, "capability list")
                self.capabilities = check_capabilities(caps, pos)
            elif sub.name == "configuration/target-page-bits":
                bits, pos = self.parse(c.Int32ub, pos, "target page bits")
                check_page_bits(bits, pos - 4)
            elif sub.name == "configuration/uuid":
                pos += 16
            else:
                raise FormatError(f"unknown configuration subsection {sub.name!r} at offset {pos}")
        return pos

    def section(self, pos: int) -> int:
        kind = self.byte(pos, "a section")
        if kind == SectionType.COMMAND:
            _, after = self.parse(c.COMMAND, pos, "command section")
            return after
        if kind == SectionType.START:
            head, after = self.parse(c.SECTION_FULL, pos, "section header")
            check_ram_start(head, pos, self.ram_id)
            self.ram_id = head.section_id
            after = self.block_table(after)
        elif kind in (SectionType.PART, SectionType.END):
            head, after = self.parse(c.SECTION_PART, pos, "section header")
            if self.ram_id is None or head.section_id != self.ram_id:
                raise FormatError(f"section {kind} at offset {pos} continues section {head.section_id}, not RAM")
            self.ram_done = kind == SectionType.END
        elif kind in (SectionType.FULL, SectionType.EOF):
            raise FormatError(
                f"device section at offset {pos} before the RAM section ended: not a complete precopy stream "
                "(postcopy and incomplete saves are not supported)"
            )
        else:
            raise FormatError(f"unknown section type {kind:#04x} at offset {pos}")
        assert self.scanner is not None
        after = self.scanner.scan(after)
        footer, after = self.parse(c.FOOTER, after, "section footer")
        if footer.section_id != self.ram_id:
            raise FormatError(
                f"section footer at offset {after - 5} names section {footer.section_id}, not {self.ram_id}"
            )
        return after

    def block_table(self, pos: int) -> int:
        """Read the MEM_SIZE record of the RAM START section and its table of blocks."""
        if pos + 8 > self.size:
            raise FormatError(f"stream truncated in the RAM block table at offset {pos}")
        (header,) = struct.unpack_from(">Q", self.view, pos)
        if header & 0xFFF != RamFlag.MEM_SIZE:
            raise FormatError(
                f"RAM section at offset {pos} does not start with its block table (flags {header & 0xFFF:#x})"
            )
        total, table_at = header & ~0xFFF, pos
        check_ram_claim(total, table_at, self.max_ram)
        pos += 8
        ignore_shared = "x-ignore-shared" in self.capabilities
        mapped = "mapped-ram" in self.capabilities
        schema = c.block_entry(guest_address=ignore_shared, mapped_ram=mapped)
        entries: list[tuple[str, int, int | None, MappedBlock | None]] = []
        seen = 0
        while seen < total:
            if len(entries) >= MAX_BLOCKS:
                raise FormatError(f"RAM block table at offset {table_at} lists more than {MAX_BLOCKS} blocks")
            entry_at = pos
            entry, pos = self.parse(schema, pos, "RAM block table")
            info = None
            if mapped:
                info = self.mapped_block(entry, entry_at, pos)
                pos = info.pages_offset + entry.used_length
            entries.append((entry.name, entry.used_length, entry.guest_address, info))
            seen += entry.used_length
        if seen != total:
            raise FormatError(
                f"RAM block table at offset {table_at} does not add up: blocks hold {seen} bytes, the header says "
                f"{total}"
                + (" (was it saved with x-ignore-shared or mapped-ram?)" if not (ignore_shared or mapped) else "")
            )
        self.blocks = place_blocks(entries, table_at)
        image = ImageFile(image_size(self.blocks), self.tmpdir)
        self.scanner = RecordScanner(self.buf, self.blocks, image, self.mapping)
        return pos

    def mapped_block(self, entry: Any, entry_at: int, header_end: int) -> MappedBlock:
        m = entry.mapped
        npages = entry.used_length // PAGE_SIZE
        bitmap_end = m.bitmap_offset + (npages + 63) // 64 * 8
        if m.version != 1 or m.page_size != PAGE_SIZE:
            raise FormatError(
                f"mapped-ram header of block {entry.name!r} at offset {entry_at}: version {m.version}, page size "
                f"{m.page_size}; only version 1 with {PAGE_SIZE}-byte pages is known"
            )
        if m.bitmap_offset != header_end or m.pages_offset % _MAPPED_ALIGN or m.pages_offset < bitmap_end:
            raise FormatError(
                f"mapped-ram header of block {entry.name!r} at offset {entry_at}: bitmap at {m.bitmap_offset}, pages "
                f"at {m.pages_offset} do not follow the header as QEMU places them"
            )
        if m.pages_offset + entry.used_length > self.size:
            raise FormatError(
                f"mapped-ram file truncated: block {entry.name!r} needs pages up to "
                f"{m.pages_offset + entry.used_length}, "
                f"the file has {self.size} bytes"
            )
        return MappedBlock(m.bitmap_offset, m.pages_offset)
