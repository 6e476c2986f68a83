"""Small QEVM streams built record by record, for the tests that need a stream of a given shape.

The builder writes what QEMU writes (header, configuration, RAM START with the block table,
PART/END sections of records, opaque device sections, EOF, VM description), and lets a test put
anything it likes in between: refused flags, truncations, tables that do not add up.
"""

from __future__ import annotations

import io
import json
import struct
from typing import BinaryIO

PAGE = 4096
MIB = 1 << 20
ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
XBZRLE, HOOK, COMPRESS, FLUSH = 0x40, 0x80, 0x100, 0x200


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def name(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


class StreamBuilder:
    """Appends stream elements; :meth:`bytes` gives the stream so far."""

    def __init__(
        self,
        blocks: list[tuple[str, int]],
        *,
        version: int = 3,
        machine: str = "pc-i440fx-7.2",
        capabilities: list[str] | None = None,
        addresses: list[int] | None = None,
    ) -> None:
        self.blocks = blocks
        self.out = bytearray(struct.pack(">II", 0x5145564D, version))
        self.out += b"\x07" + struct.pack(">I", len(machine)) + machine.encode()
        self.capabilities = capabilities or []
        if self.capabilities:
            self.out += b"\x05" + name("configuration/capabilities") + struct.pack(">II", 1, len(self.capabilities))
            for cap in self.capabilities:
                self.out += name(cap)
        self.addresses = addresses
        self.last: str | None = None
        self.device_sections: list[dict[str, object]] = []

    def bytes(self) -> bytes:
        return bytes(self.out)

    def start(self, section_id: int = 2, idstr: str = "ram", version: int = 4, total: int | None = None) -> None:
        self.out += b"\x01" + struct.pack(">I", section_id) + name(idstr) + struct.pack(">II", 0, version)
        total = sum(length for _, length in self.blocks) if total is None else total
        self.out += be64(total | MEM_SIZE)
        for i, (block, length) in enumerate(self.blocks):
            self.out += name(block) + be64(length)
            if self.addresses is not None:
                self.out += be64(self.addresses[i])
        self.last = None

    def part(self, section_id: int = 2, end: bool = False) -> None:
        self.out += (b"\x03" if end else b"\x02") + struct.pack(">I", section_id)
        self.last = None

    def record(self, block: str, page: int, flags: int, payload: bytes = b"", *, force_name: bool = False) -> None:
        if self.last == block and not force_name:
            self.out += be64(page * PAGE | flags | CONTINUE)
        else:
            self.out += be64(page * PAGE | flags) + name(block)
        self.out += payload
        self.last = block

    def page(self, block: str, page: int, data: bytes, **kw: bool) -> None:
        assert len(data) == PAGE
        self.record(block, page, PAGE_FLAG, data, **kw)

    def zero(self, block: str, page: int, fill: int = 0, **kw: bool) -> None:
        self.record(block, page, ZERO, bytes([fill]), **kw)

    def raw(self, data: bytes) -> None:
        self.out += data

    def eos_footer(self, section_id: int = 2) -> None:
        self.out += be64(EOS) + b"\x7e" + struct.pack(">I", section_id)

    def command(self, command: int = 11, data: bytes = b"") -> None:
        self.out += b"\x08" + struct.pack(">HH", command, len(data)) + data

    def device(self, section_id: int, idstr: str, payload: bytes, instance: int = 0) -> None:
        """One opaque device section (FULL, payload, footer), listed in the VM description."""
        self.out += b"\x04" + struct.pack(">I", section_id) + name(idstr) + struct.pack(">II", instance, 1)
        self.out += payload + b"\x7e" + struct.pack(">I", section_id)
        self.device_sections.append(
            {"name": idstr, "instance_id": instance, "vmsd_name": idstr, "version": 1, "fields": []}
        )

    def devices(self) -> None:
        """Two opaque device sections, their payloads full of zero bytes and footer look-alikes."""
        self.device(3, "timer", bytes(range(40)) + b"\x7e\x00\x00\x00\x03\x00")
        self.device(4, "cpu", bytes(range(40)) + b"\x7e\x00\x00\x00\x04\x04" + bytes(8))

    def description(self) -> bytes:
        """The VM description QEMU writes after the EOF byte: VMDESCRIPTION, length, JSON."""
        desc = json.dumps({"page_size": PAGE, "devices": self.device_sections}).encode()
        return b"\x06" + struct.pack(">I", len(desc)) + desc

    def finish(self, vmdesc: bool = True) -> bytes:
        self.out += b"\x00"
        if vmdesc:
            self.out += self.description()
        return self.bytes()


def pattern(seed: int) -> bytes:
    """A recognizable non-zero page."""
    return bytes((seed * 7 + i) % 251 + 1 for i in range(PAGE))


def simple_stream(*, vmdesc: bool = True, version: int = 3) -> bytes:
    """Two blocks, pages and zero pages in two PART sections and the END, a re-sent page."""
    b = StreamBuilder([("pc.ram", 8 * PAGE), ("vga.vram", 2 * PAGE)], version=version)
    b.start()
    b.eos_footer()
    b.part()
    b.page("pc.ram", 0, pattern(0))
    b.page("pc.ram", 1, pattern(1))
    b.zero("pc.ram", 2)
    b.zero("pc.ram", 3)
    b.page("pc.ram", 4, pattern(4))
    b.eos_footer()
    b.part()
    b.zero("pc.ram", 5)
    b.page("pc.ram", 6, pattern(6))
    b.zero("pc.ram", 7)
    b.zero("vga.vram", 0)
    b.page("vga.vram", 1, pattern(9))
    b.eos_footer()
    b.command()
    b.part(end=True)
    b.page("pc.ram", 1, pattern(11), force_name=True)  # re-sent: the last write wins
    b.eos_footer()
    b.devices()
    return b.finish(vmdesc)


def ignore_shared_stream() -> tuple[bytes, bytes]:
    """An x-ignore-shared stream whose main RAM is in a RAM file, and that RAM file."""
    b = StreamBuilder([("pc.ram", 2 * PAGE), ("pc.bios", PAGE)], capabilities=["x-ignore-shared"], addresses=[0, 0])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.bios", 0, pattern(3))
    b.eos_footer()
    b.devices()
    return b.finish(), pattern(1) + bytes(PAGE)


def write_mapped_ram(
    out: BinaryIO, blocks: list[tuple[str, int]], pages: dict[tuple[str, int], bytes], *, devices: bool = True
) -> None:
    """A mapped-ram file (QEMU 9.0+, ``file:`` URI) as QEMU lays it out, written with seeks so that
    unwritten pages stay holes: each block's table entry with its header, its bitmap right after,
    its pages at the next 1 MiB boundary; then the RAM sections' ends, device state, EOF, description.

    :param pages: page data by (block name, page number); those pages get their bitmap bit.
    """
    b = StreamBuilder(blocks, capabilities=["mapped-ram"])
    b.raw(b"\x01" + struct.pack(">I", 2) + name("ram") + struct.pack(">II", 0, 4))
    b.raw(be64(sum(length for _, length in blocks) | MEM_SIZE))
    out.write(b.bytes())
    for block, length in blocks:
        out.write(name(block) + be64(length))
        bitmap_at = out.tell() + 28
        npages = length // PAGE
        bitmap = bytearray((npages + 63) // 64 * 8)
        pages_at = -(-(bitmap_at + len(bitmap)) // MIB) * MIB
        out.write(struct.pack(">IQQQ", 1, PAGE, bitmap_at, pages_at))
        for (owner, page), data in sorted(pages.items()):
            if owner == block:
                bitmap[page // 8] |= 1 << page % 8
                out.seek(pages_at + page * PAGE)
                out.write(data)
        out.seek(bitmap_at)
        out.write(bitmap)
        out.seek(pages_at + length)
    tail = StreamBuilder([])
    tail.out.clear()
    tail.eos_footer()
    tail.part(end=True)
    tail.eos_footer()
    if devices:
        tail.devices()
    out.write(tail.finish())


def mapped_ram_stream(blocks: list[tuple[str, int]], pages: dict[tuple[str, int], bytes]) -> bytes:
    """:func:`write_mapped_ram` into memory."""
    out = io.BytesIO()
    write_mapped_ram(out, blocks, pages)
    return out.getvalue()
