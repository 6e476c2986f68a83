"""RAM blocks and where they sit in the memory image.

The memory image lays the blocks of a snapshot's block table one after another, in table order,
each starting at a multiple of the page size. That table (names, lengths, guest addresses) goes
into the overlay's layout, so offsets in the image map back to blocks and guest frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from vmdelta_core.plugin import FormatError
from vmdelta_source_qemu.c_migration import PAGE_SIZE

__all__ = ["MappedBlock", "RamBlock", "blocks_from_layout", "image_size", "layout_of", "place_blocks"]

#: on an x86 ``pc``/``q35`` machine the main RAM block starts at guest physical address 0
MAIN_RAM = "pc.ram"


@attrs.frozen
class MappedBlock:
    """Where a mapped-ram file keeps one block: its dirty bitmap and its pages."""

    bitmap_offset: int
    pages_offset: int


@attrs.frozen
class RamBlock:
    """One RAM block: its name in the stream, used length, and place in the image."""

    name: str
    length: int
    offset: int
    guest_address: int | None = None
    mapped: MappedBlock | None = None

    @property
    def pages(self) -> int:
        return self.length // PAGE_SIZE

    @property
    def first_page(self) -> int:
        """Index of the block's first page in the image."""
        return self.offset // PAGE_SIZE


def place_blocks(entries: Sequence[tuple[str, int, int | None, MappedBlock | None]], where: int) -> list[RamBlock]:
    """Lay table entries ``(name, length, guest_address, mapped)`` out in the image.

    :param where: file offset of the table, for the error message.
    """
    blocks: list[RamBlock] = []
    names: set[str] = set()
    offset = 0
    for name, length, guest_address, mapped in entries:
        if not name:
            raise FormatError(f"RAM block table at offset {where}: a block without a name")
        if name in names:
            raise FormatError(f"RAM block table at offset {where}: block {name!r} listed twice")
        if length % PAGE_SIZE:
            raise FormatError(
                f"RAM block table at offset {where}: block {name!r} is {length} bytes, not a multiple of "
                f"{PAGE_SIZE} (a host page size other than {PAGE_SIZE} with postcopy-ram is not supported)"
            )
        names.add(name)
        blocks.append(RamBlock(name, length, offset, guest_address, mapped))
        offset += length
    return blocks


def image_size(blocks: Sequence[RamBlock]) -> int:
    return blocks[-1].offset + blocks[-1].length if blocks else 0


def layout_of(blocks: Sequence[RamBlock], fmt: str, *, ignore_shared: bool, **extra: Any) -> dict[str, Any]:
    """The JSON-able layout the core stores in the overlay metadata."""
    out: list[dict[str, Any]] = []
    for block in blocks:
        # The x-ignore-shared table holds each block's memory-region address, which is a guest
        # physical address only for main RAM: ROM blobs say 0, pc.rom sits inside RAM at 0xc0000.
        address = None
        if block.name == MAIN_RAM:
            address = 0 if block.guest_address is None else block.guest_address
        row = {"name": block.name, "offset": block.offset, "length": block.length, "guest_address": address}
        if ignore_shared:
            row["region_address"] = block.guest_address
        out.append(row)
    return {"format": fmt, "page_size": PAGE_SIZE, "blocks": out, **extra}


def blocks_from_layout(layout: Mapping[str, Any]) -> list[RamBlock]:
    """The blocks of a layout written by :func:`layout_of` (at apply time)."""
    try:
        return [
            RamBlock(str(b["name"]), int(b["length"]), int(b["offset"]), b.get("guest_address"))
            for b in layout["blocks"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"memory layout without a usable block table ({exc})") from None
