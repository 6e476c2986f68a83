"""Guest physical addresses to memory-image offsets, through the RAM block table.

A memory image is the guest's RAM blocks laid out one after another; the block table in
``SourceImage.layout["blocks"]`` says where each starts. On x86 ``pc``/``q35`` machines the
``pc.ram`` block starts at guest physical 0, but QEMU splits RAM of 2.75 GiB or more around the
PCI hole: the first part stays below 4 GiB (3 GiB on i440fx, 2 GiB on q35, depending on machine
type and size) and the rest appears from 4 GiB up. The split cannot be read from the image, so
above that size the user states it (option ``below_4g``) or the filter refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vmdelta_core.errors import ConfigError

__all__ = ["FOUR_GIB", "SPLIT_THRESHOLD", "RamSegments", "ram_segments"]

FOUR_GIB = 4 << 30
#: below this size QEMU keeps all of pc.ram under the PCI hole on every x86 machine type
SPLIT_THRESHOLD = 0xB000_0000

#: (guest physical start, length, image offset) rows, sorted by guest address
RamSegments = np.ndarray


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"freepfn: {what} must be an integer, got {value!r}")
    return value


def ram_segments(layout: Mapping[str, Any], image_size: int, options: Mapping[str, Any]) -> tuple[RamSegments, str]:
    """The guest-RAM segments of a memory image, and a short description for the details.

    Blocks with a ``guest_address`` map linearly; ``pc.ram`` maps from 0 with the split above.
    Without a block table the whole image is taken as ``pc.ram`` (a raw RAM dump).
    """
    blocks = list(layout.get("blocks") or [])
    if not blocks:
        blocks = [{"name": "pc.ram", "offset": 0, "length": image_size, "guest_address": 0}]
        described = "no block table: whole image as pc.ram"
    else:
        described = "block table"
    rows: list[tuple[int, int, int]] = []
    for block in blocks:
        name = str(block.get("name", ""))
        offset = _int(block.get("offset"), f"block {name!r} offset")
        length = _int(block.get("length"), f"block {name!r} length")
        if offset < 0 or length < 0 or offset + length > image_size:
            raise ConfigError(f"freepfn: block {name!r} ({offset}+{length}) lies outside the {image_size}-byte image")
        address = block.get("guest_address")
        if name == "pc.ram":
            address = 0 if address is None else _int(address, "pc.ram guest_address")
            rows.extend(_split_pc_ram(address, length, offset, options))
        elif address is not None:
            rows.append((_int(address, f"block {name!r} guest_address"), length, offset))
    if not rows:
        raise ConfigError("freepfn: the memory image has no block mapped to guest physical memory (no pc.ram)")
    segments = np.array(sorted(rows), dtype=np.int64).reshape(-1, 3)
    ends = segments[:, 0] + segments[:, 1]
    if np.any(segments[1:, 0] < ends[:-1]):
        raise ConfigError("freepfn: two RAM blocks claim the same guest physical addresses")
    return segments, described


def _split_pc_ram(address: int, length: int, offset: int, options: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    below = options.get("below_4g")
    if below is None:
        if length >= SPLIT_THRESHOLD:
            raise ConfigError(
                f"freepfn: pc.ram is {length / (1 << 30):.2f} GiB; QEMU splits RAM this large around the PCI hole "
                f"(2 GiB or 3 GiB below 4 GiB, by machine type): give the low part with option below_4g=BYTES"
            )
        return [(address, length, offset)]
    below = _int(below, "option below_4g")
    if not 0 < below <= FOUR_GIB or below % 4096:
        raise ConfigError(f"freepfn: option below_4g={below} must be a page-aligned size up to 4 GiB")
    if length <= below:
        return [(address, length, offset)]
    return [(address, below, offset), (FOUR_GIB, length - below, offset + below)]
