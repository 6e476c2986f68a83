"""Replaying a jbd2 journal in memory: the newest committed copy of each logged block.

A filesystem of a running (or crashed) guest has ``needs_recovery`` set and its latest block
bitmaps may exist only in the journal; reading the bitmaps in place would call blocks free that
the guest has allocated. This replays as e2fsck would (scan, revoke, replay passes) but only into
a mapping ``fs block -> bytes``; the image is never written.
"""

from __future__ import annotations

import construct

from vmdelta_core.plugin import FormatError
from vmdelta_filter_xray.c_disk import JBD2_HEADER, JBD2_SUPERBLOCK
from vmdelta_filter_xray.ext4 import Ext4, Unsupported

__all__ = ["JBD2_MAGIC", "replay_journal"]

JBD2_MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SUPERBLOCK_V1, SUPERBLOCK_V2, REVOKE = 1, 2, 3, 4, 5
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3, INCOMPAT_FAST_COMMIT = 0x1, 0x2, 0x8, 0x10, 0x20
TAG_ESCAPE, TAG_SAME_UUID, TAG_LAST = 0x1, 0x2, 0x8


def replay_journal(fs: Ext4) -> tuple[dict[int, bytes], dict[str, int]]:
    """The journal's committed blocks of ``fs`` (newest copy wins, revoked copies skipped).

    :returns: the overlay and counts for the overlay header (transactions, blocks).
    :raises Unsupported: an external journal or fast-commit records, which it does not replay.
    """
    sb = fs.sb
    if not fs.has_journal or not fs.needs_recovery:
        return {}, {"transactions": 0, "blocks": 0}
    if sb.s_journal_inum == 0:
        raise Unsupported("needs recovery from an external journal, which is not in this image")
    inode = fs.inode_head(sb.s_journal_inum)
    bs = fs.block_size
    size = inode.i_size_lo | (inode.i_size_high << 32)
    log_blocks = fs.file_blocks(inode, size // bs)
    if log_blocks.size == 0 or log_blocks[0] == 0:
        raise FormatError(f"xray: {fs.volume.name}: the journal inode {sb.s_journal_inum} maps no blocks")

    def log_block(n: int) -> bytes:
        if not 0 <= n < log_blocks.size or log_blocks[n] == 0:
            raise FormatError(f"xray: {fs.volume.name}: journal block {n} is not mapped")
        return fs.block(int(log_blocks[n]), in_place=True)

    try:
        jsb = JBD2_SUPERBLOCK.parse(log_block(0)[: JBD2_SUPERBLOCK.sizeof()])
    except construct.ConstructError:
        raise FormatError(f"xray: {fs.volume.name}: truncated journal superblock") from None
    if jsb.header.h_magic != JBD2_MAGIC or jsb.header.h_blocktype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
        raise FormatError(f"xray: {fs.volume.name}: no jbd2 superblock at the start of the journal")
    if jsb.s_start == 0:
        return {}, {"transactions": 0, "blocks": 0}
    incompat = jsb.s_feature_incompat if jsb.header.h_blocktype == SUPERBLOCK_V2 else 0
    if incompat & INCOMPAT_FAST_COMMIT:
        raise Unsupported("the journal uses fast commits, which are not replayed")
    if jsb.s_blocksize != bs or not 0 < jsb.s_first < jsb.s_maxlen <= log_blocks.size:
        raise FormatError(f"xray: {fs.volume.name}: journal superblock geometry does not fit the journal inode")

    csum3 = bool(incompat & INCOMPAT_CSUM_V3)
    wide = bool(incompat & INCOMPAT_64BIT)
    tag_size = 16 if csum3 else (12 if wide else 8)
    tail = 4 if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) else 0
    first, last = jsb.s_first, jsb.s_maxlen

    # pass 1: scan committed transactions, collecting tags and revokes; a log read once around
    # is all there is, however many blocks its descriptors claim (each of which would cost a copy
    # of a block in pass 2)
    transactions: list[tuple[int, list[tuple[int, int, bool]]]] = []
    revoked: dict[int, int] = {}
    position, sequence = jsb.s_start, jsb.s_sequence
    pending: list[tuple[int, int, bool]] = []
    pending_revokes: list[int] = []
    budget = last - first  # log blocks a scan may consume

    def advance(n: int) -> int:
        nonlocal budget
        budget -= 1
        return first if n + 1 >= last else n + 1

    while budget > 0:
        raw = log_block(position)
        header = JBD2_HEADER.parse(raw[:12])
        if header.h_magic != JBD2_MAGIC or header.h_sequence != sequence:
            break
        if header.h_blocktype == DESCRIPTOR:
            offset = 12
            position = advance(position)
            while offset + tag_size <= bs - tail:
                tag = raw[offset : offset + tag_size]
                number = int.from_bytes(tag[0:4], "big")
                if csum3:
                    flags = int.from_bytes(tag[4:8], "big")
                    high = int.from_bytes(tag[8:12], "big")
                else:
                    flags = int.from_bytes(tag[6:8], "big")
                    high = int.from_bytes(tag[8:12], "big") if wide else 0
                if wide:
                    number |= high << 32
                pending.append((number, position, bool(flags & TAG_ESCAPE)))
                position = advance(position)
                offset += tag_size + (0 if flags & TAG_SAME_UUID else 16)
                if flags & TAG_LAST or budget <= 0:
                    break
        elif header.h_blocktype == REVOKE:
            used = int.from_bytes(raw[12:16], "big")
            record = 8 if wide else 4
            for at in range(16, min(used, bs - tail), record):
                pending_revokes.append(int.from_bytes(raw[at : at + record], "big"))
            position = advance(position)
        elif header.h_blocktype == COMMIT:
            transactions.append((sequence, pending))
            for number in pending_revokes:
                revoked[number] = max(revoked.get(number, sequence), sequence)
            pending, pending_revokes = [], []
            sequence = (sequence + 1) & 0xFFFFFFFF
            position = advance(position)
        else:
            break

    # pass 2: replay, newest copy wins unless a revoke at or after its transaction cancels it
    overlay: dict[int, bytes] = {}
    for seq, tags in transactions:
        for number, where, escaped in tags:
            if revoked.get(number, -1) >= seq:
                continue
            data = log_block(where)
            if escaped:
                data = JBD2_MAGIC.to_bytes(4, "big") + data[4:]
            overlay[number] = data
    return overlay, {"transactions": len(transactions), "blocks": len(overlay)}
