"""Guest physical addresses to memory-image offsets, through the RAM block table.

A memory image is the guest's RAM blocks laid out one after another; the block table in
``SourceImage.layout["blocks"]`` says where each starts. On x86 ``pc``/``q35`` machines the
``pc.ram`` block starts at guest physical 0, but QEMU splits RAM of 2.75 GiB or more around the
PCI hole: the first part stays below 4 GiB (3 GiB on i440fx, 2 GiB on q35, depending on machine
type and size) and the rest appears from 4 GiB up. The split cannot be read from the image, so
above that size the user states it (option ``below_4g``) or the filter refuses.

Every address is checked against :data:`MAX_GUEST_ADDRESS` here, so page frame numbers bounded by
the RAM (:func:`ram_pages`) and their byte addresses fit int64 with room to spare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vmdelta_core.plugin import ConfigError

__all__ = [
    "FOUR_GIB",
    "MAX_GUEST_ADDRESS",
    "SPLIT_THRESHOLD",
    "RamPages",
    "RamSegments",
    "below_4g_option",
    "describe_ram",
    "inside_ram",
    "ram_pages",
    "ram_segments",
]

FOUR_GIB = 4 << 30
#: below this size QEMU keeps all of pc.ram under the PCI hole on every x86 machine type
SPLIT_THRESHOLD = 0xB000_0000
#: no guest physical address reaches this: 56 bits is the widest physical address space of any
#: architecture Linux runs on (RISC-V; x86-64 and arm64 have 52)
MAX_GUEST_ADDRESS = 1 << 56

#: (guest physical start, length, image offset) rows, sorted by guest address
RamSegments = np.ndarray
#: (first PFN, end PFN) rows, sorted and apart: the page frames lying wholly in guest RAM
RamPages = np.ndarray


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"freepfn: {what} must be an integer, got {value!r}")
    return value


def ram_segments(layout: Mapping[str, Any], image_size: int, options: Mapping[str, Any]) -> tuple[RamSegments, str]:
    """The guest-RAM segments of a memory image, and a short description for the details.

    Blocks with a ``guest_address`` map linearly; ``pc.ram`` maps from 0 with the split above.
    Without a block table the whole image is taken as ``pc.ram`` (a raw RAM dump).
    """
    below = below_4g_option(options)
    blocks = layout.get("blocks") or []
    if not isinstance(blocks, Sequence) or isinstance(blocks, (str, bytes)):
        raise ConfigError(f"freepfn: the memory image's block table is a {type(blocks).__name__}, not a list")
    if not blocks:
        blocks = [{"name": "pc.ram", "offset": 0, "length": image_size, "guest_address": 0}]
        described = "no block table: whole image as pc.ram"
    else:
        described = "block table"
    rows: list[tuple[int, int, int]] = []
    for block in blocks:
        if not isinstance(block, Mapping):
            raise ConfigError(f"freepfn: the memory image's block table holds a {type(block).__name__}, not a block")
        name = str(block.get("name", ""))
        offset = _int(block.get("offset"), f"block {name!r} offset")
        length = _int(block.get("length"), f"block {name!r} length")
        if offset < 0 or length < 0 or offset + length > image_size:
            raise ConfigError(f"freepfn: block {name!r} ({offset}+{length}) lies outside the {image_size}-byte image")
        address = block.get("guest_address")
        if name == "pc.ram":
            address = 0 if address is None else _int(address, "pc.ram guest_address")
            pieces = _split_pc_ram(address, length, offset, below)
        elif address is not None:
            pieces = [(_int(address, f"block {name!r} guest_address"), length, offset)]
        else:
            pieces = []
        for address, size, _ in pieces:
            if address < 0 or address + size > MAX_GUEST_ADDRESS:
                raise ConfigError(
                    f"freepfn: block {name!r} at guest address {address:#x}+{size:#x} lies outside any physical "
                    f"address space (0 to 2^56)"
                )
        rows.extend(pieces)
    if not rows:
        raise ConfigError("freepfn: the memory image has no block mapped to guest physical memory (no pc.ram)")
    segments = np.array(sorted(rows), dtype=np.int64).reshape(-1, 3)
    ends = segments[:, 0] + segments[:, 1]
    if np.any(segments[1:, 0] < ends[:-1]):
        raise ConfigError("freepfn: two RAM blocks claim the same guest physical addresses")
    return segments, described


def ram_pages(segments: RamSegments, page_size: int) -> RamPages:
    """The page frames lying wholly in guest RAM, as merged ``[first, end)`` PFN runs.

    Segments that touch merge first, so a page straddling two adjacent blocks counts as RAM.
    """
    merged: list[list[int]] = []
    for address, length, _ in segments.tolist():
        if length <= 0:
            continue
        if merged and address <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], address + length)
        else:
            merged.append([address, address + length])
    runs = [(-(-lo // page_size), hi // page_size) for lo, hi in merged]
    return np.array([run for run in runs if run[0] < run[1]], dtype=np.int64).reshape(-1, 2)


def describe_ram(ram: RamPages) -> str:
    """``guest RAM is PFNs 0-32767`` (the first few runs), for error messages."""
    if ram.size == 0:
        return "the guest has no whole page of RAM"
    runs = [f"{lo}-{hi - 1}" for lo, hi in ram[:3].tolist()]
    more = f" and {len(ram) - 3} more runs" if len(ram) > 3 else ""
    return f"guest RAM is PFNs {', '.join(runs)}{more}"


def below_4g_option(options: Mapping[str, Any]) -> int | None:
    """Option ``below_4g``: bytes of ``pc.ram`` under the PCI hole, or ``None`` when not given."""
    below = options.get("below_4g")
    if below is None:
        return None
    below = _int(below, "option below_4g")
    if not 0 < below <= FOUR_GIB or below % 4096:
        raise ConfigError(f"freepfn: option below_4g={below} must be a page-aligned size up to 4 GiB")
    return below


def _split_pc_ram(address: int, length: int, offset: int, below: int | None) -> list[tuple[int, int, int]]:
    if below is None:
        if length >= SPLIT_THRESHOLD:
            raise ConfigError(
                f"freepfn: pc.ram is {length / (1 << 30):.2f} GiB; QEMU splits RAM this large around the PCI hole "
                f"(2 GiB or 3 GiB below 4 GiB, by machine type): give the low part with option below_4g=BYTES"
            )
        return [(address, length, offset)]
    if length <= below:
        return [(address, length, offset)]
    return [(address, below, offset), (FOUR_GIB, length - below, offset + below)]


def inside_ram(ram: RamPages, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mask of the PFN runs ``starts[i] .. starts[i] + counts[i] - 1`` lying wholly in one RAM run.

    Compares ``counts`` with the room left in the run rather than adding, so no value overflows.
    """
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if ram.size == 0:
        return np.zeros(starts.shape, dtype=bool)
    run = np.searchsorted(ram[:, 0], starts, side="right") - 1
    found = run >= 0
    # only where a run was found is starts >= its first PFN >= 0, so that room cannot overflow
    room = np.where(found, ram[np.clip(run, 0, None), 1] - np.where(found, starts, 0), 0)
    return found & (counts > 0) & (counts <= room)
