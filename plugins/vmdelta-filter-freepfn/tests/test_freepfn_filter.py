from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from freepfn_helpers import huge_zero_image, memory_context
from vmdelta_filter_freepfn import FOUR_GIB, KPF_BUDDY, FreePfnFilter

from vmdelta_core.plugin import ConfigError, FormatError
from vmdelta_core.testing import check_filter, default_registry, main

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
    with pytest.raises(ConfigError, match=r"free.txt line 2: free PFN range 250\+10 is not guest RAM"):
        drop(ctx, [2])


def test_a_pfn_whose_address_wraps_64_bits_is_refused(tmp_path: Path) -> None:
    # (2^52 + 8) x 4096 is 2^64 + 32768: in 64-bit arithmetic that was page 8 of this small guest
    image = np.zeros(MIB, dtype=np.uint8)
    ctx = memory_context(image, image, write(tmp_path, f"{2**52 + 8} 1\n"))
    with pytest.raises(ConfigError, match=f"line 1: free PFN range {2**52 + 8}\\+1 is not guest RAM"):
        drop(ctx, [8])


@pytest.mark.parametrize("count", [2**60, 2**52, 2**63, 2**64 + 1, 257])
def test_a_huge_count_is_refused(tmp_path: Path, count: int) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    with pytest.raises(ConfigError, match=f"range 0\\+{count} is not guest RAM"):
        drop(memory_context(image, image, write(tmp_path, f"0 {count}\n")), [0])


@pytest.mark.parametrize("start", [str(2**63), hex(2**63), str(2**64 - 1), str(2**64), str(10**30)])
def test_a_start_past_int64_is_a_config_error(tmp_path: Path, start: str) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    with pytest.raises(ConfigError, match=f"line 1: free PFN range {int(start, 0)}\\+1 is not guest RAM"):
        drop(memory_context(image, image, write(tmp_path, f"{start} 1\n")), [0])


def test_random_bytes_with_a_nul_are_not_taken_for_kpageflags(tmp_path: Path) -> None:
    image = np.zeros(16 * MIB, dtype=np.uint8)  # room for all 512 entries of the 4 KiB
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(48).bytes(4096))
    with pytest.raises(FormatError, match=r"neither a text PFN list .* nor a kpageflags dump"):
        drop(memory_context(image, image, path), np.arange(4096))


def test_the_format_option_forces_the_reader(tmp_path: Path) -> None:
    assert "format" in FreePfnFilter.option_names
    image = np.zeros(MIB, dtype=np.uint8)
    flags = np.zeros(256, dtype="<u8")
    flags[[2, 3]] = 1 << KPF_BUDDY
    dump = tmp_path / "kpageflags"
    dump.write_bytes(flags.tobytes())
    result = FreePfnFilter().select(memory_context(image, image, dump, format="kpageflags"), np.arange(5))
    assert result.drop.tolist() == [False, False, True, True, False]
    assert result.details["input_format"] == "kpageflags"
    with pytest.raises(FormatError, match="not a text PFN list"):
        drop(memory_context(image, image, dump, format="ranges"), [0])
    with pytest.raises(FormatError, match="not a kpageflags dump"):
        drop(memory_context(image, image, write(tmp_path, "2 2\n"), format="kpageflags"), [0])
    for bad in ("bitmap", 3, True):
        with pytest.raises(ConfigError, match=r"option format=.* must be auto, ranges or kpageflags"):
            drop(memory_context(image, image, write(tmp_path, "2 2\n"), format=bad), [0])


def test_the_core_refuses_freepfn_without_a_list_or_on_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kinds`` and ``needs_input`` are checked by the core before ``select``: one line, no overlay."""
    image, out = tmp_path / "image", tmp_path / "vm.overlay"
    image.write_bytes(bytes(MIB))
    free = write(tmp_path, "1 1\n")
    assert main(["create", "-q", "-o", str(out), "--memory", str(image), str(image), "--filter", "freepfn"]) == 2
    assert "'freepfn' needs an input" in capsys.readouterr().err
    assert main(["create", "-q", "-o", str(out), "--disk", str(image), str(image), "--filter", f"freepfn:{free}"]) == 2
    assert "'freepfn'" in capsys.readouterr().err
    assert not out.exists()


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
    for page_size in (3000, 1 << 40, 2048, True, "4096"):
        with pytest.raises(ConfigError, match=r"page_size=.* must be a power of two from 4096 to 1048576"):
            drop(memory_context(image, image, free, page_size=page_size), [0])
    with pytest.raises(ConfigError, match="below_4g"):
        drop(memory_context(image, image, free, below_4g=123), [0])


def test_options_are_declared_and_unknown_ones_refused(tmp_path: Path) -> None:
    assert FreePfnFilter.option_names == {"format", "page_size", "below_4g"}
    image = np.zeros(MIB, dtype=np.uint8)
    with pytest.raises(ConfigError, match="unknown option 'pagesize' \\(known: below_4g, format, page_size\\)"):
        drop(memory_context(image, image, write(tmp_path, "1 1\n"), pagesize=4096), [0])
    # below_4g is checked even when no pc.ram needs splitting
    layout = {"blocks": [{"name": "ram", "offset": 0, "length": MIB, "guest_address": 0}]}
    with pytest.raises(ConfigError, match="below_4g"):
        drop(memory_context(image, image, write(tmp_path, "1 1\n"), layout, below_4g=-1), [0])


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"blocks": [{"name": "pc.ram", "offset": 0, "length": MIB, "guest_address": 2**63}]}, "address space"),
        ({"blocks": [{"name": "dimm", "offset": 0, "length": MIB, "guest_address": -4096}]}, "address space"),
        ({"blocks": [{"name": "dimm", "offset": 0, "length": MIB, "guest_address": 2**56 - 4096}]}, "address space"),
        ({"blocks": "pc.ram"}, "block table is a str"),
        ({"blocks": [["pc.ram", 0, MIB]]}, "holds a list"),
    ],
)
def test_block_tables_beyond_any_address_space_are_refused(tmp_path: Path, layout: dict, message: str) -> None:
    image = np.zeros(MIB, dtype=np.uint8)
    with pytest.raises(ConfigError, match=message):
        drop(memory_context(image, image, write(tmp_path, "1 1\n"), layout), [0])


def test_ram_high_up_maps_without_overflow(tmp_path: Path) -> None:
    # a block just under 2^56: its PFNs times the page size are still far from 2^63
    image = np.zeros(MIB, dtype=np.uint8)
    base = 2**56 - MIB
    layout = {"blocks": [{"name": "dimm", "offset": 0, "length": MIB, "guest_address": base}]}
    ctx = memory_context(image, image, write(tmp_path, f"{base // 4096 + 3} 2\n"), layout)
    assert drop(ctx, [2, 3, 4, 5]) == [False, True, True, False]


def test_registered_through_the_entry_point() -> None:
    assert isinstance(default_registry().filter("freepfn"), FreePfnFilter)
