from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from freepfn_helpers import huge_zero_image, memory_context
from vmdelta_filter_freepfn import FOUR_GIB, FreePfnFilter

from vmdelta_core.errors import ConfigError
from vmdelta_core.testing import check_filter

MIB = 1 << 20


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "free.txt"
    path.write_text(text)
    return path


def drop(ctx, candidates) -> list[bool]:
    return check_filter(FreePfnFilter(), ctx, np.asarray(candidates, dtype=np.int64)).drop.tolist()


def test_drops_units_in_free_frames(tmp_path: Path) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    ctx = memory_context(image, image, write(tmp_path, "2 3\n10 1\n"))
    assert drop(ctx, [0, 1, 2, 3, 4, 5, 10, 11]) == [False, False, True, True, True, False, True, False]


def test_pc_ram_behind_another_block(tmp_path: Path) -> None:
    # the QEMU stream source lays blocks one after another: here pc.ram starts at 64 KiB
    image = np.zeros(MIB, dtype=np.uint8)
    layout = {
        "blocks": [
            {"name": "/rom@etc/acpi/tables", "offset": 0, "length": 65536, "guest_address": None},
            {"name": "pc.ram", "offset": 65536, "length": MIB - 65536, "guest_address": 0},
        ]
    }
    ctx = memory_context(image, image, write(tmp_path, "0 1\n5 1\n"), layout)
    # PFN 0 is image unit 16, PFN 5 unit 21; the ROM units are never free
    assert drop(ctx, [0, 5, 16, 17, 21]) == [False, False, True, False, True]


def test_unit_larger_than_a_page_needs_every_page_free(tmp_path: Path) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    ctx = memory_context(image, image, write(tmp_path, "2 3\n"))
    ctx = type(ctx)(ctx.image_name, ctx.kind, 8192, ctx.base, ctx.modified, ctx.input, ctx.options)
    assert drop(ctx, [0, 1, 2]) == [False, True, False]


def test_pfns_beyond_ram_are_refused(tmp_path: Path) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    ctx = memory_context(image, image, write(tmp_path, "2 3\n250 10\n"))
    with pytest.raises(ConfigError, match="250\\+10 is not guest RAM"):
        drop(ctx, [2])


def test_without_input_or_on_disk(tmp_path: Path) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    with pytest.raises(ConfigError, match="needs the free page frames"):
        drop(memory_context(image, image, None), [0])
    ctx = memory_context(image, image, write(tmp_path, "1 1\n"))
    disk = type(ctx)("disk0", "disk", 4096, ctx.base, ctx.modified, ctx.input, {})
    with pytest.raises(ConfigError, match="disk image"):
        drop(disk, [0])


def test_no_block_table_takes_the_image_as_pc_ram(tmp_path: Path) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    ctx = memory_context(image, image, write(tmp_path, "1 1\n"), layout={})
    result = FreePfnFilter().select(ctx, np.array([0, 1], dtype=np.int64))
    assert result.drop.tolist() == [False, True]
    assert result.details["ram_layout"].startswith("no block table")
    assert result.reason == "free-page"


def test_no_guest_ram_block(tmp_path: Path) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    layout = {"blocks": [{"name": "vga.vram", "offset": 0, "length": MIB, "guest_address": None}]}
    with pytest.raises(ConfigError, match="no block mapped"):
        drop(memory_context(image, image, write(tmp_path, "1 1\n"), layout), [0])


def test_big_guest_needs_the_pci_hole_split(tmp_path: Path) -> None:
    image = huge_zero_image(4 << 30)  # 4 GiB of pc.ram, costs no memory
    free = write(tmp_path, f"0 1\n{FOUR_GIB // 4096} 2\n")
    with pytest.raises(ConfigError, match="below_4g"):
        drop(memory_context(image, image, free), [0])
    # i440fx with 4 GiB: 3 GiB below the hole, 1 GiB from 4 GiB up
    ctx = memory_context(image, image, free, below_4g=3 << 30)
    high = (3 << 30) // 4096  # the page at guest 4 GiB is image offset 3 GiB
    assert drop(ctx, [0, 1, high, high + 1, high + 2]) == [True, False, True, True, False]
    # a PFN inside the PCI hole is not RAM
    hole = write(tmp_path, f"{(3 << 30) // 4096 + 5} 1\n")
    with pytest.raises(ConfigError, match="not guest RAM"):
        drop(memory_context(image, image, hole, below_4g=3 << 30), [0])


def test_bad_options(tmp_path: Path) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    free = write(tmp_path, "1 1\n")
    with pytest.raises(ConfigError, match="page_size"):
        drop(memory_context(image, image, free, page_size=3000), [0])
    with pytest.raises(ConfigError, match="below_4g"):
        drop(memory_context(image, image, free, below_4g=123), [0])


def test_registered_through_the_entry_point() -> None:
    from vmdelta_core import default_registry

    assert isinstance(default_registry().filter("freepfn"), FreePfnFilter)
