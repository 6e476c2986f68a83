"""The xray filter on the real fixture disks, and its contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vmdelta_filter_xray import XrayFilter
from vmdelta_filter_xray.c_disk import EXT4_GROUP_DESC_32, EXT4_GROUP_DESC_64, EXT4_SUPERBLOCK
from xray_helpers import MIB, disk_context, dumpe2fs_free, mapped, mkfs

from vmdelta_core.plugin import ConfigError, FilterContext
from vmdelta_core.testing import check_filter, default_registry, main

UNIT = 4096


def changed_units(base: np.ndarray, modified: np.ndarray) -> np.ndarray:
    n = modified.size // UNIT
    return np.flatnonzero((base.reshape(n, UNIT) != modified.reshape(n, UNIT)).any(axis=1)).astype(np.int64)


@pytest.mark.fixtures
def test_fixture_drops_changed_units_free_in_the_modified_filesystem(fixture_set: Path) -> None:
    base, modified = mapped(fixture_set / "base.img"), mapped(fixture_set / "modified.img")
    changed = changed_units(base, modified)
    result = check_filter(XrayFilter(), disk_context(base, modified), changed)
    free = dumpe2fs_free(fixture_set / "modified.img")  # 4 KiB blocks: one block per unit
    expected = np.array([unit in free for unit in changed.tolist()])
    assert np.array_equal(result.drop, expected)
    assert result.reason == "free-block"
    assert result.details["dropped"] == int(expected.sum()) > 0
    fs = result.details["filesystems"][0]
    assert fs["free_blocks"] == len(free) and fs["needs_recovery"] is True
    # free in the *modified* filesystem, not the base: units the guest freed since A are
    # dropped, units it allocated since A are kept even when they were free in the base
    base_free = dumpe2fs_free(fixture_set / "base.img")
    dropped = set(changed[result.drop].tolist())
    assert dropped <= free
    assert any(unit in base_free and unit not in free for unit in changed.tolist())


@pytest.mark.fixtures
def test_rebuilt_disk_differs_from_the_modified_one_only_in_free_blocks(fixture_set: Path) -> None:
    base, modified = mapped(fixture_set / "base.img"), mapped(fixture_set / "modified.img")
    changed = changed_units(base, modified)
    dropped = changed[XrayFilter().select(disk_context(base, modified), changed).drop]
    rebuilt = np.array(modified).reshape(-1, UNIT)
    rebuilt[dropped] = base.reshape(-1, UNIT)[dropped]
    differs = np.flatnonzero((rebuilt != modified.reshape(-1, UNIT)).any(axis=1))
    assert differs.size > 0 and set(differs.tolist()) <= dumpe2fs_free(fixture_set / "modified.img")


@pytest.mark.fixtures
def test_schemas_round_trip_the_fixture_superblock_and_descriptors(fixture_set: Path) -> None:
    data = mapped(fixture_set / "modified.img")
    raw = bytes(data[1024:2048])
    sb = EXT4_SUPERBLOCK.parse(raw)
    assert sb.s_magic == 0xEF53 and sb.s_desc_size == 64
    assert EXT4_SUPERBLOCK.build(sb) == raw
    desc = bytes(data[4096 : 4096 + 64])
    parsed = EXT4_GROUP_DESC_64.parse(desc)
    assert parsed.bg_block_bitmap_lo == 17 and parsed.bg_inode_table_lo == 49  # dumpe2fs: bitmap at 17, table 49
    assert EXT4_GROUP_DESC_64.build(parsed) == desc


def test_32_bit_descriptor_round_trip(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MIB, "-t", "ext4", "-b", "1024", "-O", "^64bit")
    data = mapped(image)
    table = bytes(data[2048 : 2048 + 64])  # 1 KiB blocks: descriptors in block 2
    first = EXT4_GROUP_DESC_32.parse(table[:32])
    assert EXT4_GROUP_DESC_32.build(first) == table[:32]
    assert 2 < first.bg_block_bitmap_lo < 16 * 1024


def test_conformance_on_a_fresh_filesystem(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MIB, "-t", "ext4", "-b", "4096")
    data = mapped(image)
    everything = np.arange(data.size // UNIT, dtype=np.int64)
    result = check_filter(XrayFilter(), disk_context(data, data), everything)
    free = dumpe2fs_free(image)
    assert everything[result.drop].tolist() == sorted(free)


def test_units_smaller_than_a_block_and_partial_blocks(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MIB, "-t", "ext4", "-b", "4096")
    data = mapped(image)
    free = dumpe2fs_free(image)
    block = min(b for b in free if b + 1 in free and b - 1 not in free)
    ctx = disk_context(data, data)
    ctx = FilterContext(ctx.image_name, ctx.kind, 1024, ctx.base, ctx.modified, None, {})
    # the 1 KiB units of the first free block are dropped, those of the used block before are not
    units = np.arange((block - 1) * 4, (block + 1) * 4, dtype=np.int64)
    assert XrayFilter().select(ctx, units).drop.tolist() == [False] * 4 + [True] * 4


def test_an_input_and_a_wrong_journal_option_are_refused() -> None:
    data = np.zeros(MIB, dtype=np.uint8)
    ctx = disk_context(data, data)
    with pytest.raises(ConfigError, match="takes no input"):
        XrayFilter().select(
            FilterContext("d", "disk", UNIT, ctx.base, ctx.modified, Path("x"), {}), np.zeros(0, np.int64)
        )
    with pytest.raises(ConfigError, match="journal"):
        XrayFilter().select(disk_context(data, data, journal="maybe"), np.zeros(0, np.int64))


def test_the_core_refuses_xray_on_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kinds`` is checked by the core before ``select``: one line, no overlay."""
    image, out = tmp_path / "image", tmp_path / "vm.overlay"
    image.write_bytes(bytes(MIB))
    assert main(["create", "-q", "-o", str(out), "--memory", str(image), str(image), "--filter", "xray"]) == 2
    assert "'xray'" in capsys.readouterr().err
    assert not out.exists()


def test_a_disk_without_a_filesystem_drops_nothing_and_says_so() -> None:
    data = np.zeros(MIB, dtype=np.uint8)
    result = XrayFilter().select(disk_context(data, data), np.arange(256, dtype=np.int64))
    assert not result.drop.any()
    assert result.details["left_alone"] == ["whole disk: not ext2/3/4, left alone"]


def test_registered_through_the_entry_point() -> None:
    assert isinstance(default_registry().filter("xray"), XrayFilter)
