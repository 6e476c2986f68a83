"""Free-block sets cross-checked against dumpe2fs on filesystems made by mke2fs and on the fixtures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from vmdelta_filter_xray import Ext4, Unsupported, Volume, free_ranges
from xray_helpers import MIB, blocks_of, dumpe2fs_free, mapped, mkfs, need, tool

from vmdelta_core.plugin import FormatError


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred KiB of files in nested folders, so bitmaps are not trivial."""
    root = tmp_path_factory.mktemp("content")
    rng = np.random.default_rng(5)
    for d in range(6):
        folder = root / f"d{d}"
        folder.mkdir()
        for f in range(12):
            (folder / f"f{f}").write_bytes(rng.integers(0, 256, int(rng.integers(1, 40_000)), dtype=np.uint8).tobytes())
    return root


VARIANTS = {
    "ext4 1k 32-bit descriptors, BLOCK_UNINIT": ("-t", "ext4", "-b", "1024", "-O", "^64bit"),
    "ext4 4k 64-bit descriptors": ("-t", "ext4", "-b", "4096", "-O", "64bit", "-g", "2048"),
    "ext4 flex_bg 4 with meta_bg": ("-t", "ext4", "-b", "1024", "-G", "4", "-O", "meta_bg,^resize_inode"),
    "ext4 without flex_bg": ("-t", "ext4", "-b", "2048", "-O", "^flex_bg"),
    "ext3": ("-t", "ext3", "-b", "1024"),
    "ext2": ("-t", "ext2", "-b", "4096", "-g", "4096"),
}


@pytest.mark.parametrize("args", VARIANTS.values(), ids=VARIANTS.keys())
def test_free_blocks_match_dumpe2fs(tmp_path: Path, content: Path, args: tuple[str, ...]) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 64 * MIB, *args, populate=content)
    data = mapped(image)
    fs = Ext4(data, Volume("whole disk", 0, data.size))
    assert fs.group_count > 1
    lo, hi = fs.free_ranges()
    assert blocks_of(lo, hi, fs.block_size) == dumpe2fs_free(image)


def test_block_uninit_groups_are_exercised(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 64 * MIB, "-t", "ext4", "-b", "1024")
    data = mapped(image)
    fs = Ext4(data, Volume("whole disk", 0, data.size))
    flags = [d[3] for d in fs.descriptors()]
    assert sum(1 for f in flags if f & 0x2) >= 4
    # their bitmap blocks on disk are never read: zero them and nothing changes
    copy = np.array(data)
    for block_bitmap, _, _, flag in fs.descriptors():
        if flag & 0x2:
            copy[block_bitmap * 1024 : (block_bitmap + 1) * 1024] = 0xFF
    before = fs.free_ranges()
    after = Ext4(copy, Volume("whole disk", 0, copy.size)).free_ranges()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_fixture_disk_matches_dumpe2fs(fixture_set: Path) -> None:
    for name in ("base.img", "modified.img"):
        path = fixture_set / name
        lo, hi, details = free_ranges(mapped(path), replay=False)
        assert details["partitioning"] == "whole disk"
        assert blocks_of(lo, hi, 4096) == dumpe2fs_free(path)


def test_journal_copy_wins_over_a_stale_bitmap(fixture_set: Path, tmp_path: Path) -> None:
    """The fixture's filesystem needs recovery and its journal holds block bitmap 17. Make the
    bitmap in place stale (as after a crash before checkpoint): replay must read the journal's
    copy, exactly as e2fsck's journal recovery does."""
    need("e2fsck")
    stale = tmp_path / "stale.img"
    shutil.copyfile(fixture_set / "modified.img", stale)
    with open(stale, "r+b") as f:
        f.seek(17 * 4096 + 300)
        f.write(bytes(100))  # blocks 2400-3199 (file data) marked free in place
    in_place = free_ranges(mapped(stale), replay=False)
    replayed = free_ranges(mapped(stale), replay=True)
    in_place_blocks = blocks_of(in_place[0], in_place[1], 4096)
    replayed_blocks = blocks_of(replayed[0], replayed[1], 4096)
    assert set(range(2400, 3200)) <= in_place_blocks
    # (dumpe2fs refuses the stale copy: its bitmap checksum no longer matches)
    assert in_place_blocks == dumpe2fs_free(fixture_set / "modified.img") | set(range(2400, 3200))
    assert replayed[2]["filesystems"][0]["journal"]["transactions"] == 3
    recovered = tmp_path / "recovered.img"
    shutil.copyfile(stale, recovered)
    subprocess.run([tool("e2fsck"), "-E", "journal_only", "-y", str(recovered)], check=True, capture_output=True)
    assert replayed_blocks == dumpe2fs_free(recovered)
    assert not replayed_blocks & set(range(2400, 3200))


def test_metadata_is_in_use_whatever_the_bitmap_says(fixture_set: Path, tmp_path: Path) -> None:
    """A damaged bitmap calling the inode tables free (blocks 49-2096 of the fixture, packed by
    flex_bg into group 0) made xray drop them; the filesystem's own metadata stays in use."""
    data = np.array(mapped(fixture_set / "modified.img"))
    data[17 * 4096 : 17 * 4096 + 300] = 0  # group 0's bitmap: blocks 0-2399 free
    lo, hi, _ = free_ranges(data, replay=False)
    free = blocks_of(lo, hi, 4096)
    assert set(range(2097, 2400)) <= free  # file data: the bitmap is believed
    metadata = set(range(0, 17)) | {17, 33} | set(range(49, 2097))  # superblock and descriptors,
    assert not free & metadata  # the bitmaps, the inode table


def test_other_filesystems_are_left_alone_and_said_so(tmp_path: Path) -> None:
    data = np.zeros(4 * MIB, dtype=np.uint8)
    data[3:11] = np.frombuffer(b"MSDOS5.0", dtype=np.uint8)
    lo, _, details = free_ranges(data)
    assert lo.size == 0 and details["left_alone"] == ["whole disk: not ext2/3/4, left alone"]


def test_bigalloc_is_left_alone(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 64 * MIB, "-t", "ext4", "-O", "bigalloc", "-C", "16384")
    lo, _, details = free_ranges(mapped(image))
    assert lo.size == 0 and "bigalloc" in details["left_alone"][0]


@pytest.mark.parametrize(
    ("field_offset", "value", "message"),
    [
        (1024 + 24, 9, "block size"),  # s_log_block_size
        (1024 + 32, 0, "geometry"),  # s_blocks_per_group
        (1024 + 4, 0xFFFFFF, "bytes in a"),  # s_blocks_count_lo beyond the volume
    ],
)
def test_damaged_superblocks_are_format_errors(tmp_path: Path, field_offset: int, value: int, message: str) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MIB, "-t", "ext4", "-b", "4096")
    data = np.array(mapped(image))
    data[field_offset : field_offset + 4] = np.frombuffer(value.to_bytes(4, "little"), dtype=np.uint8)
    with pytest.raises(FormatError, match=message):
        free_ranges(data)


def test_bitmap_pointer_outside_the_filesystem(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MIB, "-t", "ext4", "-b", "4096", "-O", "^metadata_csum,^uninit_bg")
    data = np.array(mapped(image))
    data[4096 : 4096 + 4] = np.frombuffer((10**6).to_bytes(4, "little"), dtype=np.uint8)  # group 0 block bitmap
    with pytest.raises(FormatError, match="outside the filesystem"):
        free_ranges(data)


def test_journal_device_is_not_a_filesystem(tmp_path: Path) -> None:
    image = tmp_path / "journal.img"
    mkfs(image, 8 * MIB, "-O", "journal_dev", "-b", "4096")
    with pytest.raises(Unsupported, match="journal device"):
        Ext4(mapped(image), Volume("whole disk", 0, 8 * MIB))
