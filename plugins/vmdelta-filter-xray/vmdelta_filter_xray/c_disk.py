"""Binary layouts read by xray: MBR, GPT, ext2/3/4 superblock and group descriptors, jbd2 journal.

Declarations only (construct); the logic that walks them lives in :mod:`partitions`,
:mod:`ext4` and :mod:`journal`. Offsets in comments are from the start of each structure.
"""

from __future__ import annotations

from construct import (
    Array,
    Bytes,
    Const,
    Int8ul,
    Int16ul,
    Int32ub,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

__all__ = [
    "EXT4_EXTENT",
    "EXT4_EXTENT_HEADER",
    "EXT4_EXTENT_IDX",
    "EXT4_GROUP_DESC_32",
    "EXT4_GROUP_DESC_64",
    "EXT4_INODE_HEAD",
    "EXT4_SUPERBLOCK",
    "GPT_ENTRY",
    "GPT_HEADER",
    "JBD2_HEADER",
    "JBD2_SUPERBLOCK",
    "MBR",
    "MBR_ENTRY",
]

# --------------------------------------------------------------------------------------------
# partition tables
# --------------------------------------------------------------------------------------------

MBR_ENTRY = Struct(
    "status" / Int8ul,  # 0x80 bootable, 0x00 not; anything else: not a partition table
    "chs_first" / Bytes(3),
    "type" / Int8ul,  # 0x83 Linux, 0x05/0x0F/0x85 extended, 0xEE GPT protective
    "chs_last" / Bytes(3),
    "lba_start" / Int32ul,
    "sectors" / Int32ul,
)

MBR = Struct(
    "bootcode" / Bytes(440),
    "disk_signature" / Int32ul,
    "reserved" / Int16ul,
    "partitions" / Array(4, MBR_ENTRY),
    "signature" / Const(b"\x55\xaa"),
)

GPT_HEADER = Struct(
    "signature" / Const(b"EFI PART"),
    "revision" / Int32ul,
    "header_size" / Int32ul,  # 92; the CRC covers this many bytes
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "current_lba" / Int64ul,
    "backup_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "entries_lba" / Int64ul,
    "num_entries" / Int32ul,
    "entry_size" / Int32ul,  # 128, or a larger multiple of 8
    "entries_crc32" / Int32ul,
)

GPT_ENTRY = Struct(
    "type_guid" / Bytes(16),  # all zero: unused entry
    "unique_guid" / Bytes(16),
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,  # inclusive
    "attributes" / Int64ul,
    "name" / Bytes(72),  # UTF-16LE, zero padded
)

# --------------------------------------------------------------------------------------------
# ext2/3/4 (little endian); the superblock sits 1024 bytes into the filesystem
# --------------------------------------------------------------------------------------------

EXT4_SUPERBLOCK = Struct(
    "s_inodes_count" / Int32ul,  # 0
    "s_blocks_count_lo" / Int32ul,
    "s_r_blocks_count_lo" / Int32ul,
    "s_free_blocks_count_lo" / Int32ul,
    "s_free_inodes_count" / Int32ul,  # 16
    "s_first_data_block" / Int32ul,  # 1 for 1 KiB blocks, else 0
    "s_log_block_size" / Int32ul,  # block size = 1024 << this
    "s_log_cluster_size" / Int32ul,
    "s_blocks_per_group" / Int32ul,  # 32
    "s_clusters_per_group" / Int32ul,
    "s_inodes_per_group" / Int32ul,
    "s_mtime" / Int32ul,
    "s_wtime" / Int32ul,  # 48
    "s_mnt_count" / Int16ul,
    "s_max_mnt_count" / Int16ul,
    "s_magic" / Int16ul,  # 56: 0xEF53
    "s_state" / Int16ul,
    "s_errors" / Int16ul,
    "s_minor_rev_level" / Int16ul,
    "s_lastcheck" / Int32ul,  # 64
    "s_checkinterval" / Int32ul,
    "s_creator_os" / Int32ul,
    "s_rev_level" / Int32ul,  # 76
    "s_def_resuid" / Int16ul,
    "s_def_resgid" / Int16ul,
    "s_first_ino" / Int32ul,  # 84
    "s_inode_size" / Int16ul,  # 88
    "s_block_group_nr" / Int16ul,
    "s_feature_compat" / Int32ul,  # 92
    "s_feature_incompat" / Int32ul,  # 96
    "s_feature_ro_compat" / Int32ul,  # 100
    "s_uuid" / Bytes(16),  # 104
    "s_volume_name" / Bytes(16),  # 120
    "s_last_mounted" / Bytes(64),  # 136
    "s_algorithm_usage_bitmap" / Int32ul,  # 200
    "s_prealloc_blocks" / Int8ul,
    "s_prealloc_dir_blocks" / Int8ul,
    "s_reserved_gdt_blocks" / Int16ul,  # 206
    "s_journal_uuid" / Bytes(16),  # 208
    "s_journal_inum" / Int32ul,  # 224
    "s_journal_dev" / Int32ul,
    "s_last_orphan" / Int32ul,
    "s_hash_seed" / Bytes(16),  # 236
    "s_def_hash_version" / Int8ul,  # 252
    "s_jnl_backup_type" / Int8ul,
    "s_desc_size" / Int16ul,  # 254: 64 with the 64bit feature, else 0 (= 32)
    "s_default_mount_opts" / Int32ul,  # 256
    "s_first_meta_bg" / Int32ul,  # 260
    "s_mkfs_time" / Int32ul,
    "s_jnl_blocks" / Array(17, Int32ul),  # 268
    "s_blocks_count_hi" / Int32ul,  # 336
    "s_r_blocks_count_hi" / Int32ul,
    "s_free_blocks_count_hi" / Int32ul,
    "s_min_extra_isize" / Int16ul,  # 348
    "s_want_extra_isize" / Int16ul,
    "s_flags" / Int32ul,  # 352
    "s_raid_stride" / Int16ul,
    "s_mmp_interval" / Int16ul,
    "s_mmp_block" / Int64ul,  # 360
    "s_raid_stripe_width" / Int32ul,  # 368
    "s_log_groups_per_flex" / Int8ul,  # 372
    "s_checksum_type" / Int8ul,
    "s_reserved_pad" / Int16ul,
    "s_kbytes_written" / Int64ul,  # 376
    "s_tail" / Bytes(1024 - 384),  # later fields (orphan file, encryption, checksum) xray does not use
)

#: 32-byte group descriptor (no 64bit feature)
EXT4_GROUP_DESC_32 = Struct(
    "bg_block_bitmap_lo" / Int32ul,
    "bg_inode_bitmap_lo" / Int32ul,
    "bg_inode_table_lo" / Int32ul,
    "bg_free_blocks_count_lo" / Int16ul,
    "bg_free_inodes_count_lo" / Int16ul,
    "bg_used_dirs_count_lo" / Int16ul,
    "bg_flags" / Int16ul,  # 18: INODE_UNINIT 1, BLOCK_UNINIT 2, ITABLE_ZEROED 4
    "bg_exclude_bitmap_lo" / Int32ul,
    "bg_block_bitmap_csum_lo" / Int16ul,
    "bg_inode_bitmap_csum_lo" / Int16ul,
    "bg_itable_unused_lo" / Int16ul,
    "bg_checksum" / Int16ul,
)

#: 64-byte group descriptor (64bit feature, s_desc_size >= 64); larger sizes pad after it
EXT4_GROUP_DESC_64 = Struct(
    *EXT4_GROUP_DESC_32.subcons,
    "bg_block_bitmap_hi" / Int32ul,  # 32
    "bg_inode_bitmap_hi" / Int32ul,
    "bg_inode_table_hi" / Int32ul,
    "bg_free_blocks_count_hi" / Int16ul,  # 44
    "bg_free_inodes_count_hi" / Int16ul,
    "bg_used_dirs_count_hi" / Int16ul,
    "bg_itable_unused_hi" / Int16ul,
    "bg_exclude_bitmap_hi" / Int32ul,  # 52
    "bg_block_bitmap_csum_hi" / Int16ul,
    "bg_inode_bitmap_csum_hi" / Int16ul,
    "bg_reserved" / Int32ul,
)

#: the start of an inode, up to the block map (enough to find the journal's blocks)
EXT4_INODE_HEAD = Struct(
    "i_mode" / Int16ul,
    "i_uid" / Int16ul,
    "i_size_lo" / Int32ul,
    "i_atime" / Int32ul,
    "i_ctime" / Int32ul,
    "i_mtime" / Int32ul,
    "i_dtime" / Int32ul,
    "i_gid" / Int16ul,
    "i_links_count" / Int16ul,
    "i_blocks_lo" / Int32ul,
    "i_flags" / Int32ul,  # 32: 0x80000 extents
    "i_osd1" / Int32ul,
    "i_block" / Bytes(60),  # 40: extent tree root, or 12 direct + 3 indirect block numbers
    "i_generation" / Int32ul,
    "i_file_acl_lo" / Int32ul,
    "i_size_high" / Int32ul,  # 108
)

EXT4_EXTENT_HEADER = Struct(
    "eh_magic" / Const(0xF30A, Int16ul),
    "eh_entries" / Int16ul,
    "eh_max" / Int16ul,
    "eh_depth" / Int16ul,  # 0: the entries are extents, else index entries
    "eh_generation" / Int32ul,
)

EXT4_EXTENT = Struct(
    "ee_block" / Int32ul,  # first logical block
    "ee_len" / Int16ul,  # above 32768: an unwritten extent of ee_len - 32768 blocks
    "ee_start_hi" / Int16ul,
    "ee_start_lo" / Int32ul,
)

EXT4_EXTENT_IDX = Struct(
    "ei_block" / Int32ul,
    "ei_leaf_lo" / Int32ul,
    "ei_leaf_hi" / Int16ul,
    "ei_unused" / Int16ul,
)

# --------------------------------------------------------------------------------------------
# jbd2 journal (big endian)
# --------------------------------------------------------------------------------------------

JBD2_HEADER = Struct(
    "h_magic" / Int32ub,  # 0xC03B3998
    "h_blocktype" / Int32ub,  # 1 descriptor, 2 commit, 3/4 superblock v1/v2, 5 revoke
    "h_sequence" / Int32ub,
)

JBD2_SUPERBLOCK = Struct(
    "header" / JBD2_HEADER,
    "s_blocksize" / Int32ub,
    "s_maxlen" / Int32ub,  # blocks in the journal
    "s_first" / Int32ub,  # first log block
    "s_sequence" / Int32ub,  # first transaction expected in the log
    "s_start" / Int32ub,  # log block of that transaction; 0: the journal is empty
    "s_errno" / Int32ub,
    "s_feature_compat" / Int32ub,
    "s_feature_incompat" / Int32ub,  # 0x2 64bit, 0x8 csum v2, 0x10 csum v3, 0x20 fast commit
    "s_feature_ro_compat" / Int32ub,
    "s_uuid" / Bytes(16),
    "s_nr_users" / Int32ub,
    "s_dynsuper" / Int32ub,
    "s_max_transaction" / Int32ub,
    "s_max_trans_data" / Int32ub,
    "s_checksum_type" / Int8ul,
    Padding(3),
    "s_num_fc_blks" / Int32ub,  # fast-commit blocks at the end of the journal (0: 256 if enabled)
)
