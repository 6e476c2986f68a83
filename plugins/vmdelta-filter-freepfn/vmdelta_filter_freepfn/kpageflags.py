"""The layout of a ``/proc/kpageflags`` entry: one little-endian u64 of ``KPF_*`` bits per page frame.

Bits 0-26 are Linux's stable user-space ABI (``include/uapi/linux/kernel-page-flags.h``); bits
32-42 are the kernel's own "hacking assistance" bits (``include/linux/kernel-page-flags.h``),
which ``fs/proc/page.c`` exports as well. No kernel sets bits 27-31 or 43-63, and a frame without
a ``struct page`` reads as ``KPF_NOPAGE`` alone: a file that breaks either rule is not a dump.
"""

from __future__ import annotations

__all__ = ["DEFINED_FLAGS", "ENTRY_SIZE", "KPF_BITS", "KPF_BUDDY", "KPF_NOPAGE"]

#: bytes per page frame in the file
ENTRY_SIZE = 8

KPF_BITS: dict[str, int] = {
    # stable ABI
    "LOCKED": 0,
    "ERROR": 1,
    "REFERENCED": 2,
    "UPTODATE": 3,
    "DIRTY": 4,
    "LRU": 5,
    "ACTIVE": 6,
    "SLAB": 7,
    "WRITEBACK": 8,
    "RECLAIM": 9,
    "BUDDY": 10,
    "MMAP": 11,
    "ANON": 12,
    "SWAPCACHE": 13,
    "SWAPBACKED": 14,
    "COMPOUND_HEAD": 15,
    "COMPOUND_TAIL": 16,
    "HUGE": 17,
    "UNEVICTABLE": 18,
    "HWPOISON": 19,
    "NOPAGE": 20,
    "KSM": 21,
    "THP": 22,
    "OFFLINE": 23,
    "ZERO_PAGE": 24,
    "IDLE": 25,
    "PGTABLE": 26,
    # kernel hacking assistance, "subject to change" but exported all the same
    "RESERVED": 32,
    "MLOCKED": 33,
    "MAPPEDTODISK": 34,
    "PRIVATE": 35,
    "PRIVATE_2": 36,
    "OWNER_PRIVATE": 37,
    "ARCH": 38,
    "UNCACHED": 39,
    "SOFTDIRTY": 40,
    "ARCH_2": 41,
    "ARCH_3": 42,
}

#: the first page of a free buddy block (the block's order is not in the file)
KPF_BUDDY = KPF_BITS["BUDDY"]
#: a frame with no ``struct page`` (a hole); the kernel writes this bit and nothing else
KPF_NOPAGE = KPF_BITS["NOPAGE"]
#: every bit some kernel sets
DEFINED_FLAGS = sum(1 << bit for bit in KPF_BITS.values())
