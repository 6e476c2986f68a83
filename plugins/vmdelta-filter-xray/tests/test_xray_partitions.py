"""Volumes behind MBR (primary and logical) and GPT tables written by sfdisk, with mke2fs inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vmdelta_filter_xray import find_volumes, free_ranges
from vmdelta_filter_xray.c_disk import GPT_ENTRY, GPT_HEADER, MBR
from xray_helpers import MIB, blocks_of, dumpe2fs_free, mapped, mkfs, partition

from vmdelta_core.plugin import FormatError

SECTOR = 512


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """p1 ext4, p2 FAT type (empty), extended p3 holding logical p5 (ext2) and p6 (ext4)."""
    path = tmp_path_factory.mktemp("mbr") / "disk.img"
    partition(
        path,
        96 * MIB,
        "label: dos\nstart=2048, size=32M, type=83\nsize=8M, type=0c\nsize=50M, type=5\n"
        f"{path}5 : size=16M, type=83\n{path}6 : size=20M, type=83\n",
    )
    for number, args in (
        (1, ("-t", "ext4", "-b", "1024")),
        (
            5,
            (
                "-t",
                "ext2",
            ),
        ),
        (6, ("-t", "ext4", "-O", "^64bit")),
    ):
        volume = next(v for v in find_volumes(mapped(path))[0] if v.name == f"mbr {number}")
        mkfs(path, volume.length, *args, offset=volume.offset)
    return path


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt") / "disk.img"
    partition(
        path,
        64 * MIB,
        "label: gpt\nsize=24M, type=L, name=root\nsize=8M, type=U, name=esp\nsize=24M, type=L, name=data\n",
    )
    for volume in find_volumes(mapped(path))[0]:
        if volume.name != "gpt 2 'esp'":
            mkfs(path, volume.length, "-t", "ext4", "-b", "4096", offset=volume.offset)
    return path


def test_mbr_primary_and_logical_partitions(mbr_disk: Path) -> None:
    volumes, scheme = find_volumes(mapped(mbr_disk))
    assert scheme == "mbr"
    assert [(v.name, v.type) for v in volumes] == [
        ("mbr 1", "0x83"),
        ("mbr 2", "0x0c"),
        ("mbr 5", "0x83"),
        ("mbr 6", "0x83"),
    ]
    assert volumes[0].offset == 2048 * SECTOR and volumes[0].length == 32 * MIB


def test_mbr_free_blocks_match_dumpe2fs_per_partition(mbr_disk: Path) -> None:
    data = mapped(mbr_disk)
    lo, hi, details = free_ranges(data)
    assert [row["volume"] for row in details["filesystems"]] == ["mbr 1", "mbr 5", "mbr 6"]
    assert details["left_alone"] == ["mbr 2: not ext2/3/4, left alone"]
    for row in details["filesystems"]:
        start, end = row["offset"], row["offset"] + row["length"]
        inside = (lo >= start) & (hi <= end)
        assert blocks_of(lo[inside], hi[inside], row["block_size"], start) == dumpe2fs_free(mbr_disk, start)


def test_gpt_partitions_and_free_blocks(gpt_disk: Path) -> None:
    data = mapped(gpt_disk)
    volumes, scheme = find_volumes(data)
    assert scheme == "gpt"
    assert [v.name for v in volumes] == ["gpt 1 'root'", "gpt 2 'esp'", "gpt 3 'data'"]
    assert volumes[0].type == "0fc63daf-8483-4772-8e79-3d69d8477de4"  # Linux filesystem
    lo, hi, details = free_ranges(data)
    assert details["left_alone"] == ["gpt 2 'esp': not ext2/3/4, left alone"]
    for volume in (volumes[0], volumes[2]):
        inside = (lo >= volume.offset) & (hi <= volume.offset + volume.length)
        assert blocks_of(lo[inside], hi[inside], 4096, volume.offset) == dumpe2fs_free(gpt_disk, volume.offset)


def test_damaged_primary_gpt_falls_back_to_the_backup(gpt_disk: Path) -> None:
    data = np.array(mapped(gpt_disk))
    good = find_volumes(data)[0]
    data[512 + 40] ^= 0xFF  # first usable LBA: the header CRC no longer matches
    assert find_volumes(data)[0] == good
    data[-512 + 40] ^= 0xFF  # the backup too
    with pytest.raises(FormatError, match=r"no usable GPT.*CRC32"):
        find_volumes(data)


def test_schemas_round_trip_the_tables_sfdisk_wrote(mbr_disk: Path, gpt_disk: Path) -> None:
    raw = bytes(mapped(mbr_disk)[:512])
    assert MBR.build(MBR.parse(raw)) == raw
    gpt = bytes(mapped(gpt_disk)[: 34 * 512])
    header = GPT_HEADER.parse(gpt[512:])
    assert GPT_HEADER.build(header) == gpt[512 : 512 + 92]
    entries = gpt[1024 : 1024 + header.num_entries * header.entry_size]
    first = GPT_ENTRY.parse(entries[:128])
    assert GPT_ENTRY.build(first) == entries[:128]
    assert first.name.decode("utf-16-le").rstrip("\0") == "root"


def test_partition_beyond_the_disk_makes_it_a_whole_disk_volume() -> None:
    data = np.zeros(MIB, dtype=np.uint8)
    entry = bytes([0x00, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (10**6).to_bytes(4, "little")
    data[446:462] = np.frombuffer(entry, dtype=np.uint8)
    data[510:512] = (0x55, 0xAA)
    volumes, scheme = find_volumes(data)
    assert scheme == "whole disk" and len(volumes) == 1


def test_looping_ebr_chain_is_a_format_error(mbr_disk: Path) -> None:
    data = np.array(mapped(mbr_disk))
    extended = next(e for e in MBR.parse(bytes(data[:512])).partitions if e.type == 5).lba_start
    first = MBR.parse(bytes(data[extended * SECTOR : extended * SECTOR + 512]))
    second_rel = first.partitions[1].lba_start
    # make the second EBR link to itself
    at = (extended + second_rel) * SECTOR + 446 + 16
    link = bytes([0, 0, 0, 0, 0x05, 0, 0, 0]) + second_rel.to_bytes(4, "little") + (1).to_bytes(4, "little")
    data[at : at + 16] = np.frombuffer(link, dtype=np.uint8)
    with pytest.raises(FormatError, match="loops"):
        find_volumes(data)


def test_ebr_beyond_the_disk(mbr_disk: Path) -> None:
    data = np.array(mapped(mbr_disk))
    extended = next(e for e in MBR.parse(bytes(data[:512])).partitions if e.type == 5).lba_start
    at = extended * SECTOR + 446 + 16 + 8
    data[at : at + 4] = np.frombuffer((10**7).to_bytes(4, "little"), dtype=np.uint8)
    with pytest.raises(FormatError, match="beyond the disk"):
        find_volumes(data)
