"""Writing a qcow2 that holds chosen clusters of a raw image, optionally over a backing file.

Used for thin synthesis (``apply --disk-format qcow2``: only the clusters the overlay changed,
backed by the base disk) and for rebuilding a standalone qcow2 (only the clusters holding
data). The file is laid out densely in one pass — header, L1 table, refcount table, refcount
blocks, L2 tables, data — so every cluster in the file is used exactly once and the refcounts
are all 1; QEMU's ``qemu-img check`` finds nothing to repair or leak. The cost is
proportional to the clusters written, not to the disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import numpy as np

from vmdelta_core.plugin import ConfigError, hole_extents, map_readonly
from vmdelta_source_disk import c_qcow2 as c
from vmdelta_source_disk.extents import copy_range, to_spans

__all__ = ["MAX_L1_BYTES", "WriteResult", "l1_bytes", "write_qcow2"]

_REFCOUNT_ORDER = 4  # 16-bit refcounts, the only width version 2 knows
_HEADER_LENGTH_V3 = 112
_BATCH = 256  # clusters read at a time when looking for all-zero ones
#: the largest L1 table QEMU opens (``QCOW_MAX_L1_SIZE``)
MAX_L1_BYTES = 32 << 20


def l1_bytes(size: int, cluster_bits: int) -> int:
    """Bytes of the L1 table of a ``size``-byte disk with ``1 << cluster_bits``-byte clusters."""
    cs = 1 << cluster_bits
    return -(-size // (cs * (cs // 8))) * 8


@attrs.frozen
class WriteResult:
    data_clusters: int
    zero_clusters: int
    file_size: int


def _zero_clusters(source: Path, clusters: np.ndarray, cs: int, size: int) -> np.ndarray:
    """Which of ``clusters`` read as zeros in ``source``: holes without reading, the rest by content."""
    zero = np.zeros(clusters.shape[0], dtype=bool)
    holes = to_spans(hole_extents(source))
    starts, ends = clusters * cs, np.minimum((clusters + 1) * cs, size)
    if holes.shape[0]:
        i = np.searchsorted(holes[:, 0], starts, side="right") - 1
        zero = (i >= 0) & (ends <= holes[np.maximum(i, 0), 1])
    data, closers = map_readonly(source)
    try:
        length = data.shape[0]
        zero |= starts >= length
        todo = np.flatnonzero(~zero)
        whole = todo[ends[todo] - starts[todo] == cs]
        whole = whole[ends[whole] <= length]
        full_units = data[: (length // cs) * cs].reshape(-1, cs)
        for k in range(0, whole.shape[0], _BATCH):
            pick = whole[k : k + _BATCH]
            zero[pick] = ~full_units[clusters[pick]].view(np.uint64).any(axis=1)
        for n in np.setdiff1d(todo, whole).tolist():  # a short last cluster
            zero[n] = not data[starts[n] : min(ends[n], length)].any()
        del full_units
    finally:
        del data
        for closer in closers:
            closer.close()  # type: ignore[attr-defined]
    return zero


def _metadata_clusters(fixed: int, cs: int) -> tuple[int, int]:
    """(refcount table clusters, refcount block clusters) for ``fixed`` other clusters."""
    per_block = cs * 8 // (1 << _REFCOUNT_ORDER)
    rtc, rbc = 1, 1
    while True:
        total = fixed + rtc + rbc
        need_rbc = -(-total // per_block)
        need_rtc = -(-need_rbc * 8 // cs)
        if (need_rbc, need_rtc) == (rbc, rtc):
            return rtc, rbc
        rbc, rtc = max(rbc, need_rbc), max(rtc, need_rtc)


def _header_cluster(
    cs: int,
    *,
    version: int,
    cluster_bits: int,
    size: int,
    l1_size: int,
    l1_offset: int,
    rt_offset: int,
    rtc: int,
    backing: tuple[str, str] | None,
) -> bytes:
    header_length = _HEADER_LENGTH_V3 if version >= 3 else 72
    extensions = []
    if backing is not None:
        fmt = backing[1].encode()
        extensions.append({"type": c.EXT_BACKING_FORMAT, "length": len(fmt), "data": fmt})
    extensions.append({"type": c.EXT_END, "length": 0, "data": b""})
    ext_bytes = c.HeaderExtensions.build(extensions)
    name = backing[0].encode() if backing is not None else b""
    if len(name) > 1023:
        raise ConfigError(f"the backing file name {backing[0]!r} is longer than qcow2 allows (1023 bytes)")  # type: ignore[index]
    name_offset = header_length + len(ext_bytes)
    header = c.Qcow2Header.build(
        {
            "version": version,
            "backing_file_offset": name_offset if name else 0,
            "backing_file_size": len(name),
            "cluster_bits": cluster_bits,
            "size": size,
            "crypt_method": 0,
            "l1_size": l1_size,
            "l1_table_offset": l1_offset,
            "refcount_table_offset": rt_offset,
            "refcount_table_clusters": rtc,
            "nb_snapshots": 0,
            "snapshots_offset": 0,
            "v3": None
            if version < 3
            else {
                "incompatible_features": 0,
                "compatible_features": 0,
                "autoclear_features": 0,
                "refcount_order": _REFCOUNT_ORDER,
                "header_length": header_length,
                "compression_type": 0,
            },
        }
    )
    return (header + ext_bytes + name).ljust(cs, b"\0")


def write_qcow2(
    output: Path,
    source: Path,
    clusters: np.ndarray,
    *,
    size: int,
    cluster_bits: int = 16,
    version: int = 3,
    backing: tuple[str, str] | None = None,
) -> WriteResult:
    """Write ``output``: a qcow2 of ``size`` bytes defining ``clusters`` with ``source``'s bytes.

    :param source: a raw image of ``size`` bytes (the rebuilt disk).
    :param clusters: guest cluster indices to define; the rest reads from ``backing`` (or zeros).
    :param backing: (file name as stored, format) of the backing file, or ``None``.
    """
    if size % 512:
        raise ConfigError(f"a qcow2 disk must be a whole number of 512-byte sectors; {size} bytes is not")
    if version not in (2, 3) or not 9 <= cluster_bits <= 21:
        raise ConfigError(f"cannot write qcow2 version {version} with cluster_bits {cluster_bits}")
    if l1_bytes(size, cluster_bits) > MAX_L1_BYTES:
        raise ConfigError(
            f"a {size}-byte disk with {1 << cluster_bits}-byte clusters needs an L1 table over "
            f"{MAX_L1_BYTES >> 20} MiB, more than QEMU opens; use larger clusters"
        )
    cs = 1 << cluster_bits
    virtual = -(-size // cs)
    clusters = np.unique(np.asarray(clusters, dtype=np.int64))
    clusters = clusters[(clusters >= 0) & (clusters < virtual)]
    zero = _zero_clusters(source, clusters, cs, size)
    if backing is None:  # unallocated reads as zeros: zero clusters need no entry at all
        clusters, zero = clusters[~zero], zero[~zero]
    # version 2 has no zero flag: a zero cluster over a backing file is allocated (and left a hole)
    allocated = clusters if version < 3 else clusters[~zero]
    l2e = cs // 8
    l1_size = max(1, -(-virtual // l2e))
    l1c = -(-l1_size * 8 // cs)
    tables = np.unique(clusters // l2e)
    rtc, rbc = _metadata_clusters(1 + l1c + tables.shape[0] + allocated.shape[0], cs)
    l1_at, rt_at = cs, (1 + l1c) * cs
    rb_at = rt_at + rtc * cs
    l2_at = rb_at + rbc * cs
    data_at = l2_at + tables.shape[0] * cs
    total = data_at // cs + allocated.shape[0]

    l1 = np.zeros(l1c * l2e, dtype=np.uint64)
    l1[tables] = (l2_at + np.arange(tables.shape[0], dtype=np.uint64) * cs) | c.L2_COPIED
    l2 = np.zeros((tables.shape[0], l2e), dtype=np.uint64)
    row, slot = np.searchsorted(tables, clusters // l2e), clusters % l2e
    host = np.zeros(clusters.shape[0], dtype=np.uint64)
    in_alloc = np.isin(clusters, allocated, assume_unique=True)
    host[in_alloc] = (data_at + np.arange(allocated.shape[0], dtype=np.uint64) * cs) | np.uint64(c.L2_COPIED)
    host[~in_alloc] = c.L2_ZERO
    l2[row, slot] = host
    rt = np.zeros(rtc * l2e, dtype=np.uint64)
    rt[:rbc] = rb_at + np.arange(rbc, dtype=np.uint64) * cs
    refcounts = np.zeros(rbc * cs // 2, dtype=np.uint16)
    refcounts[:total] = 1

    header = _header_cluster(
        cs,
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_offset=l1_at,
        rt_offset=rt_at,
        rtc=rtc,
        backing=backing,
    )
    metadata = b"".join(
        [
            header,
            c.Table(l1.shape[0]).build(l1),
            c.Table(rt.shape[0]).build(rt),
            c.Table(refcounts.shape[0], ">u2").build(refcounts),
            c.Table(l2.size).build(l2.ravel()),
        ]
    )
    assert len(metadata) == data_at
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total * cs)
        os.pwrite(fd, metadata, 0)
        written = clusters[in_alloc & ~zero]  # zero clusters of a version 2 file stay holes
        if written.shape[0]:
            hosts = (host[in_alloc & ~zero] & np.uint64(c.L2_OFFSET_MASK)).astype(np.int64)
            brk = np.ones(written.shape[0], dtype=bool)
            brk[1:] = (written[1:] != written[:-1] + 1) | (hosts[1:] != hosts[:-1] + cs)
            first = np.flatnonzero(brk)
            last = np.append(first[1:] - 1, written.shape[0] - 1)
            with open(source, "rb") as src:
                for a, b in zip(first.tolist(), last.tolist(), strict=True):
                    start = int(written[a]) * cs
                    end = min((int(written[b]) + 1) * cs, size)
                    copy_range(src.fileno(), fd, start, int(hosts[a]), end - start)
    finally:
        os.close(fd)
    return WriteResult(int(allocated.shape[0]), int(zero.sum()), total * cs)
