"""The ``xray`` filter: drop changed disk units that are free blocks of the modified filesystem."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from vmdelta_core.plugin import ConfigError, Filter, FilterContext, FilterResult, units_covered
from vmdelta_filter_xray.ext4 import Ext4, Unsupported, is_ext
from vmdelta_filter_xray.journal import replay_journal
from vmdelta_filter_xray.partitions import Volume, find_volumes

__all__ = ["XrayFilter", "free_ranges"]


class XrayFilter(Filter):
    """Drops a changed unit whose bytes all lie in free blocks of an ext2/3/4 filesystem.

    Filesystems are found on the whole disk or behind MBR (with logical partitions) or GPT. Only
    the *modified* disk is read. A filesystem that needs recovery is read through its journal's
    committed blocks (see :mod:`vmdelta_filter_xray.journal`); option ``journal = "ignore"``
    reads the bitmaps in place instead. Volumes xray does not understand are left alone and
    listed once in the details.
    """

    name = "xray"
    option_names = frozenset({"journal"})
    kinds: ClassVar[frozenset[str]] = frozenset({"disk"})
    needs_input = False

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        # the core calls select only on a disk image (kinds); an input it lets through
        if context.input is not None:
            raise ConfigError("xray reads the disk itself and takes no input: use --filter xray")
        journal = context.options.get("journal", "replay")
        if journal not in ("replay", "ignore"):
            raise ConfigError(f"xray: option journal={journal!r} must be replay or ignore")
        starts, ends, details = free_ranges(context.modified.data, replay=journal == "replay")
        candidates = np.asarray(candidates, dtype=np.int64)
        # free ranges of two volumes that meet inside a unit each cover only part of it: kept
        drop = units_covered(starts, ends, candidates, context.unit_size, context.modified.size)
        details["candidates"] = int(candidates.size)
        details["dropped"] = int(np.count_nonzero(drop))
        return FilterResult(drop=drop, reason="free-block", details=details)


def free_ranges(data: np.ndarray, *, replay: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Free filesystem blocks of a disk image as sorted byte ranges, and what was found."""
    volumes, scheme = find_volumes(data)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    found: list[dict[str, Any]] = []
    skipped: list[str] = []
    for volume in volumes:
        row: dict[str, Any] = {"volume": volume.name, "offset": volume.offset, "length": volume.length}
        if volume.type:
            row["type"] = volume.type
        if not is_ext(data, volume):
            skipped.append(f"{volume.name}: not ext2/3/4, left alone")
            continue
        try:
            fs = Ext4(data, volume)
            if replay:
                overlay, counts = replay_journal(fs)
                fs.overlay = overlay
                fs.reset()
                row["journal"] = counts
            lo, hi = fs.free_ranges()
        except Unsupported as why:
            skipped.append(f"{volume.name}: {why}, left alone")
            continue
        row.update(
            filesystem="ext4" if fs.sb.s_feature_incompat & 0x40 else ("ext3" if fs.has_journal else "ext2"),
            block_size=fs.block_size,
            groups=fs.group_count,
            needs_recovery=fs.needs_recovery,
            free_blocks=int((hi - lo).sum() // fs.block_size),
        )
        found.append(row)
        starts.append(lo)
        ends.append(hi)
    lo = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    hi = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    shared = _shared(volumes)
    if shared.size:
        # a damaged or odd table: a block free in one volume may hold data of the other
        lo, hi = _subtract(lo, hi, shared)
        skipped += [f"bytes {a}-{b} lie in two volumes, left alone" for a, b in shared[:8].tolist()]
    order = np.argsort(lo, kind="stable")
    details: dict[str, Any] = {"partitioning": scheme, "filesystems": found}
    if skipped:
        details["left_alone"] = skipped
    return lo[order], hi[order], details


def _shared(volumes: list[Volume]) -> np.ndarray:
    """Byte ranges ``[start, end)`` that two or more volumes cover."""
    spans = sorted((v.offset, v.offset + v.length) for v in volumes)
    out, reach = [], 0
    for start, end in spans:
        if start < reach:
            out.append((start, min(end, reach)))
        reach = max(reach, end)
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _subtract(lo: np.ndarray, hi: np.ndarray, cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of ranges ``[lo, hi)`` outside every range of ``cut``, as merged ranges."""
    points = np.unique(np.concatenate([lo, hi, cut.ravel()]))
    left, right = points[:-1], points[1:]

    def covered(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        # how many ranges hold each elementary piece [left, right)
        return np.searchsorted(np.sort(starts), left, side="right") - np.searchsorted(np.sort(ends), left, side="right")

    keep = (covered(lo, hi) > 0) & (covered(cut[:, 0], cut[:, 1]) == 0)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], keep, [False])).astype(np.int8)))
    first, last = edges[0::2], edges[1::2] - 1
    return left[first], right[last]
