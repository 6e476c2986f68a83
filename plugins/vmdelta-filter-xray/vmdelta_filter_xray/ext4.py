"""ext2/3/4 free blocks from the block bitmaps, honouring BLOCK_UNINIT groups, flex_bg and meta_bg."""

from __future__ import annotations

from collections.abc import Mapping

import construct
import numpy as np

from vmdelta_core.plugin import FormatError
from vmdelta_filter_xray.c_disk import (
    EXT4_EXTENT,
    EXT4_EXTENT_HEADER,
    EXT4_EXTENT_IDX,
    EXT4_GROUP_DESC_32,
    EXT4_GROUP_DESC_64,
    EXT4_INODE_HEAD,
    EXT4_SUPERBLOCK,
)
from vmdelta_filter_xray.partitions import Volume

__all__ = ["Ext4", "Unsupported", "is_ext"]

EXT_MAGIC = 0xEF53
COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
INCOMPAT_KNOWN = 0x3FFFF
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
BG_BLOCK_UNINIT = 0x2
EXTENTS_FL = 0x80000
MIN_BLOCKS_PER_GROUP = 256  # mke2fs's lower limit


class Unsupported(Exception):
    """This volume holds something xray leaves alone (another filesystem, a feature it lacks)."""


def is_ext(data: np.ndarray, volume: Volume) -> bool:
    head = bytes(data[volume.offset + 1080 : volume.offset + 1082])
    return volume.length >= 2048 and head == b"\x53\xef"


def _has_super(group: int, sparse: bool) -> bool:
    if group <= 1 or not sparse:
        return True
    for base in (3, 5, 7):
        n = group
        while n % base == 0:
            n //= base
        if n == 1:
            return True
    return False


class Ext4:
    """One ext2/3/4 filesystem inside a disk image.

    Metadata blocks are read through ``overlay`` (fs block -> bytes) when given: the journal's
    committed copies, which are newer than the blocks in place while the filesystem needs
    recovery.
    """

    def __init__(self, data: np.ndarray, volume: Volume) -> None:
        self.data = data
        self.volume = volume
        self.overlay: Mapping[int, bytes] = {}
        at = volume.offset + 1024
        try:
            sb = EXT4_SUPERBLOCK.parse(bytes(data[at : at + 1024]))
        except construct.ConstructError:
            raise FormatError(f"xray: {volume.name}: truncated ext superblock at byte {at}") from None
        self.sb = sb
        if sb.s_feature_incompat & INCOMPAT_JOURNAL_DEV:
            raise Unsupported("an external ext4 journal device, not a filesystem")
        if sb.s_feature_incompat & ~INCOMPAT_KNOWN:
            raise Unsupported(f"ext4 with unknown incompatible features 0x{sb.s_feature_incompat:x}")
        if sb.s_feature_ro_compat & RO_COMPAT_BIGALLOC:
            raise Unsupported("ext4 with bigalloc (cluster bitmaps) is not read")
        if sb.s_feature_compat & COMPAT_SPARSE_SUPER2:
            raise Unsupported("ext4 with sparse_super2 is not read")
        if sb.s_log_block_size > 6:
            raise FormatError(f"xray: {volume.name}: block size 1024 << {sb.s_log_block_size} at byte {at + 24}")
        self.block_size = 1024 << sb.s_log_block_size
        # revision 0 has no inode size field: its inodes are 128 bytes
        self.inode_size = sb.s_inode_size if sb.s_rev_level else 128
        if self.inode_size < 128 or self.inode_size & (self.inode_size - 1) or self.inode_size > self.block_size:
            raise FormatError(f"xray: {volume.name}: inode size {self.inode_size} at byte {at + 88}")
        is64 = bool(sb.s_feature_incompat & INCOMPAT_64BIT)
        self.blocks_count = sb.s_blocks_count_lo | ((sb.s_blocks_count_hi << 32) if is64 else 0)
        self.desc_size = max(sb.s_desc_size, 64) if is64 else 32
        self.first_data_block = sb.s_first_data_block
        self.blocks_per_group = sb.s_blocks_per_group
        bs = self.block_size
        if (
            self.blocks_per_group == 0
            or self.blocks_per_group > 8 * bs
            or self.desc_size > bs
            or not 0 < sb.s_inodes_per_group <= 8 * bs
            or self.blocks_count <= self.first_data_block
        ):
            raise FormatError(f"xray: {volume.name}: inconsistent ext superblock geometry at byte {at}")
        if self.blocks_count * bs > volume.length:
            raise FormatError(
                f"xray: {volume.name}: ext filesystem of {self.blocks_count * bs} bytes "
                f"in a {volume.length}-byte volume"
            )
        if self.blocks_per_group < MIN_BLOCKS_PER_GROUP:
            # fewer is legal but never made by mke2fs, and every group costs a pass of Python:
            # leaving the volume alone is always safe
            raise Unsupported(f"ext with {self.blocks_per_group} blocks per group (mke2fs makes 256 or more)")
        self.group_count = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        self.sparse = bool(sb.s_feature_ro_compat & RO_COMPAT_SPARSE_SUPER)
        self.meta_bg = bool(sb.s_feature_incompat & INCOMPAT_META_BG)
        self.uninit_ok = bool(sb.s_feature_ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))
        self.needs_recovery = bool(sb.s_feature_incompat & INCOMPAT_RECOVER)
        self.has_journal = bool(sb.s_feature_compat & COMPAT_HAS_JOURNAL)
        self.desc_per_block = bs // self.desc_size
        self.inode_table_blocks = -(-(sb.s_inodes_per_group * self.inode_size) // bs)
        self._descriptors: list[tuple[int, int, int, int]] | None = None
        self._meta: tuple[np.ndarray, np.ndarray, int] | None = None

    # ----------------------------------------------------------------------------------------

    def block(self, number: int, *, in_place: bool = False) -> bytes:
        """Filesystem block ``number`` (the journal's newer copy unless ``in_place``)."""
        if not in_place and number in self.overlay:
            return self.overlay[number]
        if not 0 <= number < self.blocks_count:
            raise FormatError(f"xray: {self.volume.name}: block {number} is outside the filesystem")
        at = self.volume.offset + number * self.block_size
        return bytes(self.data[at : at + self.block_size])

    def group_start(self, group: int) -> int:
        return self.first_data_block + group * self.blocks_per_group

    def descriptor_block(self, index: int) -> int:
        """Where the ``index``-th block of group descriptors lives."""
        if self.meta_bg and index >= self.sb.s_first_meta_bg:
            group = index * self.desc_per_block
            return self.group_start(group) + int(_has_super(group, self.sparse))
        return self.first_data_block + 1 + index

    def descriptors(self) -> list[tuple[int, int, int, int]]:
        """(block bitmap, inode bitmap, inode table, flags) of every group."""
        if self._descriptors is None:
            layout = EXT4_GROUP_DESC_32 if self.desc_size == 32 else EXT4_GROUP_DESC_64
            pad = self.desc_size - layout.sizeof()
            entry = construct.Struct(*layout.subcons, construct.Padding(pad)) if pad else layout
            out: list[tuple[int, int, int, int]] = []
            for index in range(-(-self.group_count // self.desc_per_block)):
                number = self.descriptor_block(index)
                count = min(self.desc_per_block, self.group_count - index * self.desc_per_block)
                table = construct.Array(count, entry).parse(self.block(number))
                for d in table:
                    hi = self.desc_size > 32
                    out.append(
                        (
                            d.bg_block_bitmap_lo | ((d.bg_block_bitmap_hi << 32) if hi else 0),
                            d.bg_inode_bitmap_lo | ((d.bg_inode_bitmap_hi << 32) if hi else 0),
                            d.bg_inode_table_lo | ((d.bg_inode_table_hi << 32) if hi else 0),
                            d.bg_flags,
                        )
                    )
            self._descriptors = out
        return self._descriptors

    def reset(self) -> None:
        """Forget cached descriptors (after the overlay changed)."""
        self._descriptors = None
        self._meta = None

    # ----------------------------------------------------------------------------------------

    def _group_overhead(self, group: int) -> int:
        """Blocks at the start of ``group`` taken by a superblock copy and descriptor blocks."""
        if not _has_super(group, self.sparse) and not self.meta_bg:
            return 0
        used = 1 if _has_super(group, self.sparse) else 0
        desc_blocks = -(-self.group_count // self.desc_per_block)
        if self.meta_bg:
            old = self.sb.s_first_meta_bg
            if group // self.desc_per_block >= old and group % self.desc_per_block in (0, 1, self.desc_per_block - 1):
                used += 1
            elif used:
                used += old
        elif used:
            used += desc_blocks + self.sb.s_reserved_gdt_blocks
        return used

    def group_used(self) -> list[tuple[int, np.ndarray]]:
        """(first block, per-block "in use" flags) of every group, from bitmaps and uninit rules."""
        return [(self.group_start(g), self._group_bits(g)) for g in range(self.group_count)]

    def _metadata(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Every group's bitmaps and inode table as sorted (start, end) block ranges."""
        rows = []
        for block_bitmap, inode_bitmap, inode_table, _ in self.descriptors():
            rows += [(block_bitmap, block_bitmap + 1), (inode_bitmap, inode_bitmap + 1)]
            rows.append((inode_table, inode_table + self.inode_table_blocks))
        table = np.array(sorted(rows), dtype=np.int64).reshape(-1, 2)
        return table[:, 0], table[:, 1], max(self.inode_table_blocks, 1)

    def _group_bits(self, group: int) -> np.ndarray:
        start = self.group_start(group)
        count = min(self.blocks_per_group, self.blocks_count - start)
        block_bitmap, _, _, flags = self.descriptors()[group]
        if self.uninit_ok and flags & BG_BLOCK_UNINIT:
            bits = np.zeros(count, dtype=bool)  # no bitmap on disk: only metadata is in use
        else:
            if not self.first_data_block <= block_bitmap < self.blocks_count:
                raise FormatError(
                    f"xray: {self.volume.name}: group {group} block bitmap at block {block_bitmap} "
                    "is outside the filesystem"
                )
            raw = np.frombuffer(self.block(block_bitmap), dtype=np.uint8)
            bits = np.unpackbits(raw, bitorder="little")[:count].astype(bool)
        # the superblock copy and descriptors, and (flex_bg) any group's bitmaps and inode tables
        # placed here, are in use whatever a bitmap says: an uninitialised group has none to say
        # it, and a damaged one must not make xray drop the filesystem's own metadata
        bits[: self._group_overhead(group)] = True
        if self._meta is None:
            self._meta = self._metadata()
        starts, ends, longest = self._meta
        lo = int(np.searchsorted(starts, start - longest))
        hi = int(np.searchsorted(starts, start + count))
        for first, end in zip(starts[lo:hi].tolist(), ends[lo:hi].tolist(), strict=True):
            a, b = max(first, start), min(end, start + count)
            if a < b:
                bits[a - start : b - start] = True
        return bits

    def free_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """Free blocks as merged byte ranges ``[start, end)`` of the disk image.

        Built group by group, so memory follows the number of free runs, not the disk size.
        """
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for group in range(self.group_count):
            first = self.group_start(group)
            bits = self._group_bits(group)
            edges = np.flatnonzero(np.diff(np.concatenate(([True], bits, [True])).astype(np.int8)))
            runs = edges.reshape(-1, 2).astype(np.int64) + first
            starts.append(runs[:, 0])
            ends.append(runs[:, 1])
        lo = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        hi = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        if lo.size:  # merge runs that continue across a group boundary
            keep = np.concatenate(([True], lo[1:] != hi[:-1]))
            group_of = np.cumsum(keep) - 1
            merged_hi = np.zeros(int(keep.sum()), dtype=np.int64)
            np.maximum.at(merged_hi, group_of, hi)
            lo, hi = lo[keep], merged_hi
        base = self.volume.offset
        return base + lo * self.block_size, base + hi * self.block_size

    # ----------------------------------------------------------------------------------------

    def inode_head(self, number: int) -> construct.Container:
        ipg = self.sb.s_inodes_per_group
        if not 0 < number <= ipg * self.group_count:
            raise FormatError(f"xray: {self.volume.name}: inode {number} does not exist ({ipg} a group)")
        group, index = divmod(number - 1, ipg)
        table = self.descriptors()[group][2]
        per_block = self.block_size // self.inode_size
        block, slot = divmod(index, per_block)
        raw = self.block(table + block)
        at = slot * self.inode_size
        return EXT4_INODE_HEAD.parse(raw[at : at + EXT4_INODE_HEAD.sizeof()])

    def file_blocks(self, inode: construct.Container, count: int) -> np.ndarray:
        """Physical block of each of the first ``count`` logical blocks of a file (0: a hole).

        ``count`` must not exceed the filesystem's blocks: the map takes 8 bytes a block.
        """
        if not 0 <= count <= self.blocks_count:
            raise FormatError(
                f"xray: {self.volume.name}: a file of {count} blocks in a filesystem of {self.blocks_count}"
            )
        out = np.zeros(count, dtype=np.int64)
        if inode.i_flags & EXTENTS_FL:
            self._extents(inode.i_block, out, depth_left=8, seen=set())
        else:
            pointers = np.frombuffer(inode.i_block, dtype="<u4").astype(np.int64)
            out[: min(12, count)] = pointers[: min(12, count)]
            position = 12
            for level, pointer in enumerate(pointers[12:15], 1):
                position = self._indirect(int(pointer), level, out, position)
        return out

    def _extents(self, node: bytes, out: np.ndarray, depth_left: int, seen: set[int]) -> None:
        """Fill ``out`` from one node of an extent tree; ``seen`` holds the tree blocks read so
        far, each of which may be read once (a tree whose nodes share blocks costs exponential
        time)."""
        try:
            header = EXT4_EXTENT_HEADER.parse(node[:12])
        except construct.ConstructError:
            raise FormatError(f"xray: {self.volume.name}: damaged extent tree in the journal inode") from None
        if depth_left == 0:
            raise FormatError(f"xray: {self.volume.name}: extent tree deeper than 8 levels")
        if header.eh_entries > (len(node) - 12) // 12:
            raise FormatError(
                f"xray: {self.volume.name}: an extent node claims {header.eh_entries} entries, "
                f"room for {(len(node) - 12) // 12}"
            )
        for i in range(header.eh_entries):
            raw = node[12 + 12 * i : 24 + 12 * i]
            if header.eh_depth == 0:
                ext = EXT4_EXTENT.parse(raw)
                length = ext.ee_len - 32768 if ext.ee_len > 32768 else ext.ee_len
                start = ext.ee_start_lo | (ext.ee_start_hi << 32)
                lo, hi = ext.ee_block, min(ext.ee_block + length, out.size)
                if lo < hi:
                    out[lo:hi] = np.arange(start, start + hi - lo)
            else:
                idx = EXT4_EXTENT_IDX.parse(raw)
                leaf = idx.ei_leaf_lo | (idx.ei_leaf_hi << 32)
                if leaf in seen:
                    raise FormatError(f"xray: {self.volume.name}: the extent tree reaches block {leaf} twice")
                seen.add(leaf)
                self._extents(self.block(leaf), out, depth_left - 1, seen)

    def _indirect(self, pointer: int, level: int, out: np.ndarray, position: int) -> int:
        span = (self.block_size // 4) ** level
        if position >= out.size:
            return position
        if pointer == 0:
            return position + span
        entries = np.frombuffer(self.block(pointer), dtype="<u4").astype(np.int64)
        if level == 1:
            n = min(entries.size, out.size - position)
            out[position : position + n] = entries[:n]
            return position + entries.size
        for entry in entries.tolist():
            position = self._indirect(entry, level - 1, out, position)
        return position
