"""Reading one qcow2 file: its header and extensions, and its cluster map as arrays.

The header and the extensions are parsed with the schemas of :mod:`.c_qcow2`; the L1 and L2
tables are read whole and classified with numpy. Everything a damaged or unsupported file can
trip over becomes one :class:`FormatError` naming the file, the offset and what is wrong.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import numpy as np
import zstandard
from construct import ConstructError

from vmdelta_core.plugin import FormatError
from vmdelta_source_disk import c_qcow2 as c

__all__ = ["ClusterMap", "Qcow2Info", "decompress_cluster", "read_cluster_map", "read_info"]

_MAX_L1_BYTES = 32 << 20  # QEMU's own limit on the L1 table


@attrs.frozen
class Qcow2Info:
    """What the header and the extensions of one qcow2 file say."""

    path: Path
    file_size: int
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    header_length: int
    incompatible: int
    compression: str
    nb_snapshots: int
    backing_file: str | None
    backing_format: str | None
    feature_names: dict[tuple[int, int], str]

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8


@attrs.frozen
class ClusterMap:
    """The clusters a qcow2 file defines itself (everything else falls through to its backing).

    Arrays are parallel and sorted by guest offset; clusters past the virtual size are left out.
    """

    guest: np.ndarray  # int64 guest byte offsets of the clusters
    kind: np.ndarray  # uint8: DATA, COMPRESSED or ZERO
    host: np.ndarray  # int64 host byte offset (data, compressed)
    length: np.ndarray  # int64 compressed byte count (compressed only)

    DATA = 1
    COMPRESSED = 2
    ZERO = 3

    def select(self, kind: int) -> np.ndarray:
        return np.flatnonzero(self.kind == kind)


def _fail(path: Path, offset: int, what: str) -> FormatError:
    return FormatError(f"{path}: not a usable qcow2 image: {what} (at byte offset {offset})")


def _parse(schema: object, data: bytes, path: Path, offset: int, what: str) -> object:
    try:
        return schema.parse(data)  # type: ignore[attr-defined]
    except ConstructError as exc:
        detail = " ".join(str(exc).split())  # construct spreads its messages over several lines
        raise _fail(path, offset, f"cannot parse the {what}: {detail}") from None


def read_info(path: Path, fd: int) -> Qcow2Info:
    """Parse and check the header and the extensions; refuse what this reader cannot do."""
    file_size = os.fstat(fd).st_size
    first = os.pread(fd, 1 << 21, 0)  # the header and its extensions fit in the first cluster
    header = _parse(c.Qcow2Header, first, path, 0, "header")
    version, cluster_bits = header.version, header.cluster_bits  # type: ignore[attr-defined]
    if version not in (2, 3):
        raise _fail(path, 4, f"qcow2 version {version} is not supported (2 and 3 are)")
    if not 9 <= cluster_bits <= 21:
        raise _fail(path, 20, f"cluster_bits {cluster_bits} is outside 9..21")
    cluster_size = 1 << cluster_bits
    h = header
    if h.crypt_method != 0:  # type: ignore[attr-defined]
        method = {1: "AES", 2: "LUKS"}.get(h.crypt_method, str(h.crypt_method))  # type: ignore[attr-defined]
        raise _fail(path, 32, f"the image is encrypted ({method}); decrypt it first with qemu-img convert")
    incompatible, header_length, compression = 0, 72, "zlib"
    if version >= 3:
        v3 = h.v3  # type: ignore[attr-defined]
        incompatible, header_length = v3.incompatible_features, v3.header_length
        if header_length < 104 or header_length > cluster_size:
            raise _fail(path, 100, f"header_length {header_length} is impossible")
        if v3.compression_type is not None:
            if v3.compression_type not in c.COMPRESSION_TYPES:
                raise _fail(path, 104, f"unknown compression type {v3.compression_type}")
            compression = c.COMPRESSION_TYPES[v3.compression_type]
        elif incompatible & c.INCOMPAT_COMPRESSION:
            raise _fail(path, 72, "the compression-type feature is set but the header has no such field")
    backing_format, names = None, {}
    for kind, data in _extensions(path, first[:cluster_size], header_length):
        if kind == c.EXT_BACKING_FORMAT:
            backing_format = data.decode("utf-8", "replace")
        elif kind == c.EXT_FEATURE_NAMES:
            table = np.frombuffer(data, dtype=c.FEATURE_NAME_TABLE, count=len(data) // 48)
            for feature, bit, name in table.tolist():
                names[feature, bit] = name.rstrip(b"\0").decode("ascii", "replace")
    _check_features(path, incompatible, names)
    backing_file = None
    if h.backing_file_offset:  # type: ignore[attr-defined]
        start, length = h.backing_file_offset, h.backing_file_size  # type: ignore[attr-defined]
        if length == 0 or length > 1023 or start + length > min(cluster_size, file_size):
            raise _fail(path, 8, f"backing file name of {length} bytes at {start} is out of bounds")
        backing_file = first[start : start + length].decode("utf-8", "replace")
    l1_size, l1_offset = h.l1_size, h.l1_table_offset  # type: ignore[attr-defined]
    needed = -(-h.size // (cluster_size * (cluster_size // 8)))  # type: ignore[attr-defined]
    if l1_size < needed or l1_size * 8 > _MAX_L1_BYTES:
        raise _fail(path, 36, f"an L1 table of {l1_size} entries cannot map {h.size} bytes")  # type: ignore[attr-defined]
    if l1_size and (l1_offset % cluster_size or l1_offset + l1_size * 8 > file_size):
        raise _fail(path, 40, f"the L1 table offset {l1_offset} is unaligned or past the end of the file")
    return Qcow2Info(
        path=path,
        file_size=file_size,
        version=version,
        cluster_bits=cluster_bits,
        size=h.size,  # type: ignore[attr-defined]
        l1_size=l1_size,
        l1_offset=l1_offset,
        header_length=header_length,
        incompatible=incompatible,
        compression=compression,
        nb_snapshots=h.nb_snapshots,  # type: ignore[attr-defined]
        backing_file=backing_file,
        backing_format=backing_format,
        feature_names=names,
    )


def _extensions(path: Path, cluster: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """The header extensions this reader uses, as (type, data), up to the end marker.

    Walked with a plain ``struct`` rather than parsed into one object each: the extension area
    is the rest of the first cluster, up to 2 MiB of them when damaged.
    """
    head = c.EXTENSION_HEAD
    pos = start
    while True:
        if pos + head.size > len(cluster):
            raise _fail(path, pos, "the header extensions run past the first cluster without an end marker")
        kind, length = head.unpack_from(cluster, pos)
        if kind == c.EXT_END:
            return
        data = pos + head.size
        if length > len(cluster) - data:
            what = f"header extensions: one of type {kind:#010x} and {length} bytes runs past the first cluster"
            raise _fail(path, pos, what)
        if kind in (c.EXT_BACKING_FORMAT, c.EXT_FEATURE_NAMES):
            yield kind, cluster[data : data + length]
        pos = data + length + (-length % 8)


def _check_features(path: Path, incompatible: int, names: dict[tuple[int, int], str]) -> None:
    """Refuse incompatible features this reader does not implement, naming them."""
    supported = c.INCOMPAT_DIRTY | c.INCOMPAT_COMPRESSION
    refused = incompatible & ~supported
    if not refused:
        return
    labels = []
    for bit in range(64):
        if refused >> bit & 1:
            label = names.get((0, bit)) or c.INCOMPAT_KNOWN.get(bit) or "unknown"
            labels.append(f"bit {bit} ({label})")
    hint = "; run qemu-img check -r all on it" if refused & c.INCOMPAT_CORRUPT else ""
    raise _fail(path, 72, f"unsupported incompatible feature {', '.join(labels)}{hint}")


def read_cluster_map(info: Qcow2Info, fd: int) -> ClusterMap:
    """Every L2 entry of the active L1 table that is not "unallocated", classified.

    Each cluster of the file serves once: as the header, the L1 table, one L2 table or the data
    of one guest cluster. QEMU never shares them in the active tables, and a shared one would let
    a small file stand for an image of any size (one L2 table of 64 KiB clusters, listed by every
    L1 entry, maps 512 MiB each time); refusing it keeps the cluster map, and the work of
    presenting the image, proportional to the file.
    """
    path, cs, n2 = info.path, info.cluster_size, info.l2_entries
    l1 = c.Table(info.l1_size).parse(os.pread(fd, info.l1_size * 8, info.l1_offset)) if info.l1_size else []
    l1 = np.asarray(l1, dtype=np.uint64)
    bad = np.flatnonzero(l1 & np.uint64(c.L1_RESERVED))
    if bad.size:
        raise _fail(path, info.l1_offset + 8 * int(bad[0]), "an L1 entry has reserved bits set")
    l2_offsets = (l1 & np.uint64(c.L1_OFFSET_MASK)).astype(np.int64)
    listed = np.flatnonzero(l2_offsets)
    offsets = l2_offsets[listed]
    bad = np.flatnonzero((offsets % cs != 0) | (offsets > info.file_size - cs))
    if bad.size:
        at = info.l1_offset + 8 * int(listed[bad[0]])
        raise _fail(path, at, f"L2 table offset {int(offsets[bad[0]])} is unaligned or past the end")
    uses = _ClusterUses(path)
    uses.claim(np.zeros(1, dtype=np.int64), lambda k: (0, "the header"))
    if info.l1_size:
        first, end = info.l1_offset // cs, -(-(info.l1_offset + 8 * info.l1_size) // cs)
        uses.claim(np.arange(first, end, dtype=np.int64), lambda k: (info.l1_offset, "the L1 table"))
    uses.claim(
        offsets // cs,
        lambda k: (info.l1_offset + 8 * int(listed[k]), f"the L2 table of L1 entry {listed[k]} (byte {offsets[k]})"),
    )
    guests, entries, places = [], [], []
    for index in listed.tolist():
        offset = int(l2_offsets[index])
        table = c.Table(n2).parse(os.pread(fd, cs, offset))
        used = np.flatnonzero(table & np.uint64(~c.L2_COPIED & (2**64 - 1)))
        guest = (np.int64(index) * n2 + used.astype(np.int64)) * cs
        keep = guest < info.size
        guests.append(guest[keep])
        entries.append(table[used[keep]])
        places.append(offset + 8 * used[keep])
        _check_l2(info, offset, used[keep], table[used[keep]])
    guest = np.concatenate(guests) if guests else np.zeros(0, dtype=np.int64)
    entry = np.concatenate(entries) if entries else np.zeros(0, dtype=np.uint64)
    place = np.concatenate(places) if places else np.zeros(0, dtype=np.int64)
    compressed = (entry & np.uint64(c.L2_COMPRESSED)) != 0
    zero = ~compressed & ((entry & np.uint64(c.L2_ZERO)) != 0)
    kind = np.where(compressed, ClusterMap.COMPRESSED, np.where(zero, ClusterMap.ZERO, ClusterMap.DATA)).astype(
        np.uint8
    )
    x, mask = c.compressed_fields(info.cluster_bits)
    chost = (entry & np.uint64((1 << x) - 1)).astype(np.int64)
    sectors = ((entry >> np.uint64(x)) & np.uint64(mask)).astype(np.int64) + 1
    host = np.where(compressed, chost, (entry & np.uint64(c.L2_OFFSET_MASK)).astype(np.int64))
    length = np.where(compressed, sectors * 512 - (chost & 511), 0)
    host = np.where(zero, 0, host)
    late = np.flatnonzero((kind != ClusterMap.ZERO) & (host >= info.file_size))
    if late.size:
        i = int(late[0])
        raise _fail(path, int(host[i]), f"the cluster at guest offset {int(guest[i])} lies past the end of the file")
    data = np.flatnonzero(kind == ClusterMap.DATA)
    uses.claim(
        host[data] // cs,
        lambda k: (int(place[data[k]]), f"the data of guest offset {guest[data[k]]} (byte {host[data[k]]})"),
    )
    packed = np.flatnonzero(compressed)
    again = _first_repeat(host[packed])
    if again is not None:
        i = int(packed[again])
        what = f"the compressed data of guest offset {guest[i]} (byte {host[i]}) serves another cluster too"
        raise _fail(path, int(place[i]), what)
    return ClusterMap(guest=guest, kind=kind, host=host, length=length)


def _first_repeat(values: np.ndarray) -> int | None:
    """The first position whose value came earlier in ``values``, or ``None``."""
    order = np.argsort(values, kind="stable")
    repeat = np.flatnonzero(values[order][1:] == values[order][:-1])
    return int(order[repeat + 1].min()) if repeat.size else None


class _ClusterUses:
    """The clusters of a file claimed so far and what for, so that none serves twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parts: list[tuple[np.ndarray, Callable[[int], tuple[int, str]]]] = []

    def claim(self, clusters: np.ndarray, describe: Callable[[int], tuple[int, str]]) -> None:
        """Claim ``clusters``; ``describe(k)`` gives the file offset to blame and the name of the
        k-th, for the error when one is taken already."""
        before = [part for part, _ in self.parts]
        taken = np.concatenate([*before, clusters])
        again = _first_repeat(taken)
        if again is not None:
            first = int(np.flatnonzero(taken == taken[again])[0])
            _, owner = self._describe(first, [*self.parts, (clusters, describe)])
            at, what = describe(again - (taken.shape[0] - clusters.shape[0]))
            raise _fail(self.path, at, f"{what} is also {owner}")
        self.parts.append((clusters, describe))

    @staticmethod
    def _describe(position: int, parts: list[tuple[np.ndarray, Callable[[int], tuple[int, str]]]]) -> tuple[int, str]:
        for clusters, describe in parts:
            if position < clusters.shape[0]:
                return describe(position)
            position -= clusters.shape[0]
        raise IndexError(position)


def _check_l2(info: Qcow2Info, table_offset: int, slots: np.ndarray, entries: np.ndarray) -> None:
    standard = (entries & np.uint64(c.L2_COMPRESSED)) == 0
    reserved = standard & ((entries & np.uint64(c.L2_STANDARD_RESERVED)) != 0)
    unaligned = standard & ((entries & np.uint64(c.L2_OFFSET_MASK)) % np.uint64(info.cluster_size) != 0)
    # version 2 has no zero clusters; QEMU calls the flag there corruption, and so does this reader
    zero_v2 = standard & ((entries & np.uint64(c.L2_ZERO)) != 0) if info.version < 3 else np.zeros_like(standard)
    bad = np.flatnonzero(reserved | unaligned | zero_v2)
    if bad.size:
        i = int(bad[0])
        what = (
            "has reserved bits set"
            if reserved[i]
            else "is a zero cluster, which version 2 does not have"
            if zero_v2[i]
            else "points to an unaligned cluster"
        )
        raise _fail(info.path, table_offset + 8 * int(slots[i]), f"L2 entry {int(entries[i]):#018x} {what}")


def decompress_cluster(info: Qcow2Info, fd: int, host: int, length: int) -> bytes:
    """One compressed cluster, exactly a cluster long, or a FormatError at its offset."""
    cs = info.cluster_size
    data = os.pread(fd, length, host)
    try:
        if info.compression == "zlib":
            out = zlib.decompressobj(-12).decompress(data, cs)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
            out = reader.read(cs)
            while len(out) < cs:
                more = reader.read(cs - len(out))
                if not more:
                    break
                out += more
    except (zlib.error, zstandard.ZstdError) as exc:
        raise _fail(info.path, host, f"a {info.compression} compressed cluster does not decompress: {exc}") from None
    if len(out) != cs:
        raise _fail(info.path, host, f"a compressed cluster holds {len(out)} bytes, not {cs}")
    return out
