"""Fuzzing xray's readers: MBR (with logical partitions), GPT, ext2/3/4 and the jbd2 journal.

Structure-aware: small disks are built once (filesystems by mke2fs, journal transactions by
debugfs, partition tables here in Python), then fields of the superblocks, group descriptors,
bitmaps, the journal inode, the journal, the MBR, the EBRs and the GPT are damaged (with the GPT's
CRCs recomputed or not) and the disk is read under the fuzz contract. What an accepted disk must
satisfy: free ranges sorted, inside one ext volume, never on bytes two volumes share, never on a
primary superblock.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import construct
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmdelta_filter_xray import Ext4, Volume, find_volumes, free_ranges
from vmdelta_filter_xray.c_disk import (
    EXT4_GROUP_DESC_32,
    EXT4_INODE_HEAD,
    EXT4_SUPERBLOCK,
    GPT_ENTRY,
    GPT_HEADER,
    JBD2_SUPERBLOCK,
    MBR,
    MBR_ENTRY,
)
from xray_helpers import MIB, mkfs, need, tool

from vmdelta_core.plugin import FormatError, VmdeltaError
from vmdelta_core.testing import check_untrusted, fuzz_settings

SECTOR = 512
LINUX = bytes.fromhex("af3dc60f838472478e793d69d8477de4")  # 0FC63DAF-8483-4772-8E79-3D69D8477DE4


def _fields(schema: construct.Struct, base: int, order: str) -> list[tuple[int, int, str]]:
    """(offset, width, byte order) of every integer field of a flat schema; ``base`` is where
    the structure starts on the disk."""
    out, at = [], base
    for sub in schema.subcons:
        size = sub.sizeof()
        if sub.name and size in (1, 2, 4, 8):
            out.append((at, size, order))
        at += size
    return out


# ------------------------------------------------------------------------------------------------
# small disks


def _journaled(folder: Path) -> bytes:
    """8 MiB of ext4 (1 KiB blocks, 8 groups) that needs recovery: three committed
    transactions, one holding a copy of group 0's block bitmap, one a revoke."""
    path = folder / "journaled.img"
    mkfs(path, 8 * MIB, "-t", "ext4", "-b", "1024", "-g", "1024")
    data = np.fromfile(path, dtype=np.uint8)
    bitmap = Ext4(data, Volume("whole disk", 0, data.size)).descriptors()[0][0]
    (folder / "bitmap").write_bytes(bytes(data[bitmap * 1024 : (bitmap + 1) * 1024]))
    (folder / "blob").write_bytes(bytes(range(256)) * 8)
    script = f"jo\njw -b {bitmap} {folder / 'bitmap'}\njc\njo\njw -b 3000,3001 {folder / 'blob'}\njc\n"
    script += "jo\njw -r 3000\njc\n"
    (folder / "cmds").write_text(script)
    subprocess.run([tool("debugfs"), "-w", "-f", str(folder / "cmds"), str(path)], check=True, capture_output=True)
    return path.read_bytes()


def _mbr_entry(status: int, kind: int, lba: int, sectors: int) -> dict[str, Any]:
    return {
        "status": status,
        "chs_first": bytes(3),
        "type": kind,
        "chs_last": bytes(3),
        "lba_start": lba,
        "sectors": sectors,
    }


def _mbr(entries: list[dict[str, Any]]) -> bytes:
    entries = entries + [_mbr_entry(0, 0, 0, 0)] * (4 - len(entries))
    return MBR.build({"bootcode": bytes(440), "disk_signature": 0x1234, "reserved": 0, "partitions": entries})


def _mbr_disk(filesystems: dict[str, bytes]) -> bytes:
    """p1 ext4 (journaled), p2 a FAT type left empty, p3 extended: p5 ext2 and p6 ext4 meta_bg."""
    fs = 16384  # sectors of each 8 MiB filesystem
    disk = bytearray((20480 + 2 * (2048 + fs)) * SECTOR)
    disk[:SECTOR] = _mbr(
        [
            _mbr_entry(0x80, 0x83, 2048, fs),
            _mbr_entry(0, 0x0C, 18432, 2048),
            _mbr_entry(0, 0x05, 20480, 2 * (2048 + fs)),
        ]
    )
    second = 2048 + fs  # the second EBR, relative to the extended partition
    ebrs = [(20480, [_mbr_entry(0, 0x83, 2048, fs), _mbr_entry(0, 0x05, second, 2048 + fs)])]
    ebrs.append((20480 + second, [_mbr_entry(0, 0x83, 2048, fs)]))
    for lba, entries in ebrs:
        disk[lba * SECTOR : (lba + 1) * SECTOR] = _mbr(entries)
    disk[2048 * SECTOR : (2048 + fs) * SECTOR] = filesystems["journaled"]
    disk[(20480 + 2048) * SECTOR : (20480 + 2048 + fs) * SECTOR] = filesystems["ext2"]
    disk[(20480 + second + 2048) * SECTOR : (20480 + second + 2048 + fs) * SECTOR] = filesystems["meta_bg"]
    return bytes(disk)


def gpt_tables(disk: bytearray, parts: list[tuple[int, int, str]]) -> None:
    """Write a protective MBR and the primary and backup GPT for ``parts`` (first, last LBA, name)."""
    n = len(disk) // SECTOR
    disk[:SECTOR] = _mbr([_mbr_entry(0, 0xEE, 1, n - 1)])
    table = bytearray(128 * 128)
    for k, (first, last, name) in enumerate(parts):
        entry = {"type_guid": LINUX, "unique_guid": bytes([k + 1]) * 16, "first_lba": first, "last_lba": last}
        entry |= {"attributes": 0, "name": name.encode("utf-16-le").ljust(72, b"\0")}
        table[k * 128 : (k + 1) * 128] = GPT_ENTRY.build(entry)
    for current, backup, entries in ((1, n - 1, 2), (n - 1, 1, n - 33)):
        disk[entries * SECTOR : entries * SECTOR + len(table)] = table
        header = {"revision": 0x10000, "header_size": 92, "header_crc32": 0, "reserved": 0, "current_lba": current}
        header |= {"backup_lba": backup, "first_usable_lba": 34, "last_usable_lba": n - 34, "disk_guid": b"G" * 16}
        header |= {"entries_lba": entries, "num_entries": 128, "entry_size": 128, "entries_crc32": zlib.crc32(table)}
        raw = bytearray(GPT_HEADER.build(header))
        raw[16:20] = struct.pack("<I", zlib.crc32(raw))
        disk[current * SECTOR : current * SECTOR + 92] = raw


def reseal_gpt(disk: bytearray) -> None:
    """Recompute both GPTs' CRCs after damage, so that it reaches the parsers behind them."""
    n = len(disk) // SECTOR
    for lba in (1, n - 1):
        at = lba * SECTOR
        if lba < 1 or at + 92 > len(disk) or disk[at : at + 8] != b"EFI PART":
            continue
        size, _, _, _, _, _, _, entries, count, width = struct.unpack_from("<II4xQQQQ16sQII", disk, at + 12)
        if entries * SECTOR + count * width <= len(disk) and count * width <= 1 << 20:
            table = bytes(disk[entries * SECTOR : entries * SECTOR + count * width])
            struct.pack_into("<I", disk, at + 88, zlib.crc32(table))
        if 92 <= size <= SECTOR:
            raw = bytearray(disk[at : at + size])
            raw[16:20] = bytes(4)
            struct.pack_into("<I", disk, at + 16, zlib.crc32(raw))


def _gpt_disk(filesystems: dict[str, bytes]) -> bytes:
    disk = bytearray(20 * MIB)
    fs = 16384
    gpt_tables(disk, [(2048, 2048 + fs - 1, "root"), (18432, 18432 + fs - 1, "data")])
    disk[2048 * SECTOR : (2048 + fs) * SECTOR] = filesystems["journaled"]
    disk[18432 * SECTOR : (18432 + fs) * SECTOR] = filesystems["meta_bg"]
    return bytes(disk)


def _targets(disk: bytes) -> dict[str, list[tuple[int, int, str]]]:
    """Where the structures of a valid disk lie, as fields (offset, width, byte order) to damage."""
    data = np.frombuffer(disk, dtype=np.uint8)
    found: dict[str, list[tuple[int, int, str]]] = {"mbr": [], "gpt": [], "superblock": [], "descriptor": []}
    found |= {"bitmap": [], "inode": [], "journal": []}
    volumes, scheme = find_volumes(data)
    if scheme != "whole disk":
        for k in range(4):
            found["mbr"] += _fields(MBR_ENTRY, 446 + 16 * k, "<")
    if scheme == "mbr":
        for volume in volumes:  # the EBR of a logical partition lies 2048 sectors before it
            if int(volume.name.split()[1]) >= 5:
                for k in range(2):
                    found["mbr"] += _fields(MBR_ENTRY, volume.offset - 2048 * SECTOR + 446 + 16 * k, "<")
    if scheme == "gpt":
        n = len(disk) // SECTOR
        for lba, entries in ((1, 2), (n - 1, n - 33)):
            found["gpt"] += _fields(GPT_HEADER, lba * SECTOR, "<")
            for k in range(3):
                found["gpt"] += _fields(GPT_ENTRY, entries * SECTOR + 128 * k, "<")
    for volume in volumes:
        if disk[volume.offset + 1080 : volume.offset + 1082] != b"\x53\xef":
            continue
        fs = Ext4(data, volume)
        bs, at = fs.block_size, volume.offset
        found["superblock"] += _fields(EXT4_SUPERBLOCK, at + 1024, "<")
        layout = EXT4_GROUP_DESC_32
        for group in (0, 1, fs.group_count - 1):
            block = fs.descriptor_block(group // fs.desc_per_block)
            found["descriptor"] += _fields(layout, at + block * bs + (group % fs.desc_per_block) * fs.desc_size, "<")
        for block_bitmap, _, _, _ in fs.descriptors()[:3]:
            found["bitmap"] += [(at + block_bitmap * bs + k, 1, "<") for k in range(0, bs, 7)]
        if fs.has_journal:
            group_table = fs.descriptors()[0][2]
            inode = at + group_table * bs + (fs.sb.s_journal_inum - 1) * fs.inode_size
            found["inode"] += _fields(EXT4_INODE_HEAD, inode, "<")
            found["inode"] += [(inode + 40 + k, 2, "<") for k in range(0, 60, 2)]  # the extent tree
            head = fs.inode_head(fs.sb.s_journal_inum)
            log = fs.file_blocks(head, 16)
            found["journal"] += _fields(JBD2_SUPERBLOCK, at + int(log[0]) * bs, ">")
            for block in log[1:].tolist():  # descriptor, data, commit and revoke blocks
                found["journal"] += [(at + block * bs + k, 4, ">") for k in range(0, 64, 4)]
    return {k: v for k, v in found.items() if v}


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    need("mke2fs", "debugfs")
    folder = tmp_path_factory.mktemp("xray-fuzz")
    filesystems = {"journaled": _journaled(folder)}
    for name, args in (
        ("ext2", ("-t", "ext2", "-b", "4096", "-g", "512")),
        ("meta_bg", ("-t", "ext4", "-b", "1024", "-g", "1024", "-G", "4", "-O", "meta_bg,^resize_inode")),
    ):
        mkfs(folder / f"{name}.img", 8 * MIB, *args)
        filesystems[name] = (folder / f"{name}.img").read_bytes()
    built = {"journaled": filesystems["journaled"], "ext2": filesystems["ext2"]}
    built |= {"mbr": _mbr_disk(filesystems), "gpt": _gpt_disk(filesystems)}
    for name, disk in built.items():  # every disk is valid to start with
        _, _, details = free_ranges(np.frombuffer(disk, dtype=np.uint8))
        assert "left_alone" not in details or all("not ext" in why for why in details["left_alone"]), name
        TARGETS[name] = _targets(disk)
    shutil.rmtree(folder)
    return built


#: the fields to damage of each disk (filled by the ``disks`` fixture)
TARGETS: dict[str, dict[str, list[tuple[int, int, str]]]] = {}


# ------------------------------------------------------------------------------------------------
# damage

INTERESTING = (0, 1, 2, 3, 4, 7, 8, 0x80, 0xFF, 255, 256, 1023, 1024, 4096, 0x8000, 0xF30A, 0xFFFF)
INTERESTING += (0x53EF, 0xC03B3998, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1)


class Damaged:
    """A damaged disk with a short repr (hypothesis prints it, never the bytes)."""

    def __init__(self, name: str, disk: bytes, log: list[str], replay: bool) -> None:
        self.name, self.disk, self.log, self.replay = name, disk, log, replay

    def __repr__(self) -> str:
        return f"Damaged({self.name}, replay={self.replay}: {'; '.join(self.log)})"


@st.composite
def damaged_disks(draw: Any, disks: dict[str, bytes]) -> Damaged:
    name = draw(st.sampled_from(sorted(disks)))
    disk = bytearray(disks[name])
    targets = TARGETS[name]
    log: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([*sorted(targets), "bytes", "cut"]))
        if kind == "cut":
            cut = draw(st.sampled_from([0, 1024, 2048, len(disk) // 2, len(disk) - 512, len(disk) - 1]))
            log.append(f"cut at {cut}")
            del disk[cut:]
        elif kind == "bytes":
            at = draw(st.integers(0, max(0, len(disk) - 1)))
            if disk:
                disk[at] ^= draw(st.integers(1, 255))
                log.append(f"flip byte {at}")
        else:
            at, width, order = draw(st.sampled_from(targets[kind]))
            if at + width > len(disk):
                continue
            old = int.from_bytes(disk[at : at + width], "little" if order == "<" else "big")
            how = draw(st.sampled_from(["interesting", "near", "bit"]))
            if how == "interesting":
                new = draw(st.sampled_from(INTERESTING))
            elif how == "near":
                new = old + draw(st.integers(-2, 2))
            else:
                new = old ^ (1 << draw(st.integers(0, 8 * width - 1)))
            new %= 2 ** (8 * width)
            disk[at : at + width] = new.to_bytes(width, "little" if order == "<" else "big")
            log.append(f"{kind} field at {at}: {old} -> {new}")
    if name == "gpt" and draw(st.booleans()):
        reseal_gpt(disk)
        log.append("GPT CRCs recomputed")
    return Damaged(name, bytes(disk), log, draw(st.booleans()))


# ------------------------------------------------------------------------------------------------
# the contract


def _check_accepted(data: np.ndarray, lo: np.ndarray, hi: np.ndarray, details: dict[str, Any]) -> None:
    assert lo.dtype == np.int64 and hi.dtype == np.int64 and lo.shape == hi.shape
    assert (lo < hi).all() and (np.diff(lo) >= 0).all() and (lo >= 0).all() and (hi <= data.size).all()
    rows = details["filesystems"]
    inside = np.zeros(lo.shape, dtype=bool)
    for row in rows:
        start, end = row["offset"], row["offset"] + row["length"]
        inside |= (lo >= start) & (hi <= end)
        superblock = (lo < start + 2048) & (hi > start + 1024)
        assert not superblock.any(), f"the superblock of {row['volume']} is called free"
    assert inside.all(), "a free range lies outside every filesystem's volume"
    volumes, _ = find_volumes(data)
    for k, a in enumerate(volumes):
        for b in volumes[k + 1 :]:
            both = max(a.offset, b.offset), min(a.offset + a.length, b.offset + b.length)
            if both[0] < both[1]:
                assert not ((lo < both[1]) & (hi > both[0])).any(), f"bytes {both} of two volumes called free"


@fuzz_settings(100)
@given(data=st.data())
def test_fuzz_xray(disks: dict[str, bytes], data: st.DataObject) -> None:
    damaged = data.draw(damaged_disks(disks))
    disk = np.frombuffer(damaged.disk, dtype=np.uint8)
    # design bound: per group a descriptor, a bitmap block and its bits; the journal's block map
    # (8 bytes a block) and its replayed blocks (at most the journal); all within the disk's size
    bound = (16 << 20) + 8 * disk.size
    result = check_untrusted("xray", lambda: free_ranges(disk, replay=damaged.replay), memory=bound, seconds=20)
    if isinstance(result, VmdeltaError):
        assert "\n" not in str(result)
        return
    _check_accepted(disk, *result)


# ------------------------------------------------------------------------------------------------
# what the fuzzer found, one regression test each


def _field(disk: bytearray, at: int, fmt: str, value: int) -> np.ndarray:
    struct.pack_into(fmt, disk, at, value)
    return np.frombuffer(bytes(disk), dtype=np.uint8)


def _journal_inode(disk: bytes) -> int:
    data = np.frombuffer(disk, dtype=np.uint8)
    fs = Ext4(data, Volume("whole disk", 0, data.size))
    return fs.descriptors()[0][2] * fs.block_size + (fs.sb.s_journal_inum - 1) * fs.inode_size


@pytest.mark.parametrize("value", [0, 3000, 96])  # the first two were ZeroDivisionErrors
def test_an_impossible_inode_size_is_a_format_error(disks: dict[str, bytes], value: int) -> None:
    data = _field(bytearray(disks["journaled"]), 1024 + 88, "<H", value)
    with pytest.raises(FormatError, match=f"inode size {value} at byte 1112"):
        free_ranges(data)


def test_a_journal_inode_that_does_not_exist_is_a_format_error(disks: dict[str, bytes]) -> None:
    """Was an IndexError from the descriptor list."""
    data = _field(bytearray(disks["journaled"]), 1024 + 224, "<I", 10**9)
    with pytest.raises(FormatError, match="inode 1000000000 does not exist"):
        free_ranges(data)


def test_a_journal_larger_than_its_filesystem_is_refused_before_allocating(disks: dict[str, bytes]) -> None:
    """Was a map of i_size / block size entries: 2 TiB for this 8 MiB disk (a MemoryError)."""
    disk = bytearray(disks["journaled"])
    inode = _journal_inode(disk)
    struct.pack_into("<I", disk, inode + 4, 0xFFFFFFFF)
    data = _field(disk, inode + 108, "<I", 0xFFFF)
    result = check_untrusted("xray", lambda: free_ranges(data), memory=16 << 20)
    assert isinstance(result, FormatError) and "a file of 274877906943 blocks in a filesystem of 8192" in str(result)


def test_an_extent_node_claiming_more_entries_than_it_holds(disks: dict[str, bytes]) -> None:
    """Was a construct StreamError escaping."""
    disk = bytearray(disks["journaled"])
    data = _field(disk, _journal_inode(disk) + 40 + 2, "<H", 500)
    with pytest.raises(FormatError, match="an extent node claims 500 entries, room for 4"):
        free_ranges(data)


def test_an_extent_tree_that_shares_nodes_is_refused(disks: dict[str, bytes]) -> None:
    """Index nodes listing the same child over and over: 84 ** 7 visits of one leaf before."""
    disk = bytearray(disks["journaled"])
    inode = _journal_inode(disk)
    fanout, levels, first = 84, 6, 4000
    for level in range(levels):  # block first+level is an index node of 84 entries, all first+level+1
        node = struct.pack("<HHHHI", 0xF30A, fanout, fanout, levels - level, 0)
        node += struct.pack("<IIHH", 0, first + level + 1, 0, 0) * fanout
        disk[(first + level) * 1024 : (first + level) * 1024 + len(node)] = node
    leaf = struct.pack("<HHHHI", 0xF30A, 1, 4, 0, 0) + struct.pack("<IHHI", 0, 1, 0, 5000)
    disk[(first + levels) * 1024 : (first + levels) * 1024 + len(leaf)] = leaf
    root = struct.pack("<HHHHI", 0xF30A, 1, 4, levels + 1, 0) + struct.pack("<IIHH", 0, first, 0, 0)
    disk[inode + 40 : inode + 40 + len(root)] = root
    data = np.frombuffer(bytes(disk), dtype=np.uint8)
    result = check_untrusted("xray", lambda: free_ranges(data), seconds=10)
    assert isinstance(result, FormatError) and f"the extent tree reaches block {first + levels} twice" in str(result)


def test_a_transaction_longer_than_the_log_is_not_replayed(disks: dict[str, bytes]) -> None:
    """Every log block a descriptor of 84 tags, one commit found after the twentieth: the scan went
    round the 1023-block log almost twice and replayed 1680 tags as one transaction."""
    disk = bytearray(disks["journaled"])
    data = np.frombuffer(bytes(disk), dtype=np.uint8)
    fs = Ext4(data, Volume("whole disk", 0, data.size))
    log = fs.file_blocks(fs.inode_head(fs.sb.s_journal_inum), 1024).tolist()
    jsb = JBD2_SUPERBLOCK.parse(bytes(disk[log[0] * 1024 :][:1024]))
    tag = struct.pack(">IHHI", 7000, 0, 2, 0)  # SAME_UUID, never LAST: 84 of them fill a block
    descriptor = struct.pack(">III", 0xC03B3998, 1, jsb.s_sequence) + tag * 84
    for block in log[1:]:
        disk[block * 1024 : block * 1024 + len(descriptor)] = descriptor
    commit_at = 1 + 85 * 20 % 1023  # where the scan reads after twenty descriptors
    disk[log[commit_at] * 1024 : log[commit_at] * 1024 + 12] = struct.pack(">III", 0xC03B3998, 2, jsb.s_sequence)
    struct.pack_into(">I", disk, log[0] * 1024 + 28, 1)  # s_start: the first log block
    _, _, details = free_ranges(np.frombuffer(bytes(disk), dtype=np.uint8))
    assert details["filesystems"][0]["journal"] == {"transactions": 0, "blocks": 0}


def test_a_gpt_header_claiming_a_huge_size_is_refused_before_it_is_read(disks: dict[str, bytes]) -> None:
    """Was copied out of the disk up to the claimed size (4 GiB) before the size was checked."""
    disk = bytearray(disks["gpt"])
    struct.pack_into("<I", disk, SECTOR + 12, 0xFFFFFFFF)
    struct.pack_into("<I", disk, len(disk) - SECTOR + 12, 0xFFFFFFFF)
    data = np.frombuffer(bytes(disk), dtype=np.uint8)
    result = check_untrusted("xray", lambda: find_volumes(data), memory=1 << 20)
    assert isinstance(result, FormatError) and "claims a size of 4294967295 bytes" in str(result)


def test_a_gpt_entry_table_claiming_gigabytes_is_refused_before_it_is_read(disks: dict[str, bytes]) -> None:
    disk = bytearray(disks["gpt"])
    for at in (SECTOR, len(disk) - SECTOR):
        struct.pack_into("<I", disk, at + 84, 1 << 20)  # entry_size: 128 entries of 1 MiB
    reseal_gpt(disk)
    data = np.frombuffer(bytes(disk), dtype=np.uint8)
    result = check_untrusted("xray", lambda: find_volumes(data), memory=4 << 20)
    assert isinstance(result, FormatError) and "bad entry table geometry" in str(result)


def test_bytes_two_partitions_share_are_never_called_free(disks: dict[str, bytes]) -> None:
    """Was: a damaged table let partition 2 overlap partition 1, and the free blocks of one were
    dropped though the other's filesystem used them."""
    disk = bytearray(disks["gpt"])
    n = len(disk) // SECTOR
    for entries in (2, n - 33):  # partition 2 starts inside partition 1
        struct.pack_into("<Q", disk, entries * SECTOR + 128 + 32, 2048 + 8192)
    reseal_gpt(disk)
    data = np.frombuffer(bytes(disk), dtype=np.uint8)
    lo, hi, details = free_ranges(data)
    shared = (2048 + 8192) * SECTOR, (2048 + 16384) * SECTOR
    assert not ((lo < shared[1]) & (hi > shared[0])).any()
    assert any("lie in two volumes" in why for why in details["left_alone"])


def test_blocks_per_group_below_mke2fs_limit_is_left_alone(disks: dict[str, bytes]) -> None:
    """A group per 8 blocks cost a pass of Python per 8 KiB of disk; such a volume is left alone."""
    data = _field(bytearray(disks["ext2"]), 1024 + 32, "<I", 8)
    lo, _, details = free_ranges(data)
    assert lo.size == 0 and "8 blocks per group" in details["left_alone"][0]
