"""Fuzzing the qcow2 reader: header, extensions, L1/L2 tables, compressed clusters, backing chains.

Structure-aware: every example starts from a small valid image built here in Python (v2 and v3,
512-byte to 64 KiB clusters, zlib and zstd compressed clusters, a raw backing file, a qcow2 ->
qcow2 -> raw chain), damages header fields, table entries, extensions, the backing file name or
bytes, and opens it with the ``qcow2`` source under the fuzz contract. An accepted image must read
exactly as a plain cluster-by-cluster reference reader says, its holes must be zero and its hints
must cover every unit that differs from its backing file. Refcounts are not read by the source
(they say nothing about what the guest sees), so damage there must change nothing.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from vmdelta_source_disk import Qcow2Source, write_qcow2
from vmdelta_source_disk import c_qcow2 as c

from vmdelta_core.plugin import ConfigError, FormatError, VmdeltaError
from vmdelta_core.testing import check_untrusted, fuzz_settings

UNIT = 4096
#: (offset, width) of every header field, version 3 included
HEADER_FIELDS = {
    "version": (4, 4),
    "backing_file_offset": (8, 8),
    "backing_file_size": (16, 4),
    "cluster_bits": (20, 4),
    "size": (24, 8),
    "crypt_method": (32, 4),
    "l1_size": (36, 4),
    "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4),
    "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8),
    "compatible_features": (80, 8),
    "autoclear_features": (88, 8),
    "refcount_order": (96, 4),
    "header_length": (100, 4),
    "compression_type": (104, 1),
}


# ------------------------------------------------------------------------------------------------
# a plain reference reader: cluster by cluster, no cleverness (trusted only on accepted images)


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 8], "big")


#: what the reference reads from a compressed cluster that does not decompress
UNREADABLE = b"unreadable! " * (1 << 18)


def backing_of(path: Path) -> tuple[Path, str | None] | None:
    """The backing file a qcow2 names and the format its extension gives, if any."""
    data = path.read_bytes()
    if data[:4] != c.MAGIC:
        return None
    version, name_at, name_size = struct.unpack_from(">IQI", data, 4)
    if not name_at:
        return None
    header_length = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    fmt, pos = None, header_length
    while (kind := struct.unpack_from(">I", data, pos)[0]) != c.EXT_END:
        length = struct.unpack_from(">I", data, pos + 4)[0]
        if kind == c.EXT_BACKING_FORMAT:
            fmt = data[pos + 8 : pos + 8 + length].decode("utf-8", "replace")
        pos += 8 + length + (-length % 8)
    name = data[name_at : name_at + name_size].decode("utf-8", "replace")
    return (Path(name) if os.path.isabs(name) else path.parent / name), fmt


def reference(path: Path, size: int | None = None, fmt: str | None = None) -> bytes:
    """What a guest reads from ``path`` (qcow2, or raw when ``fmt`` says so or it has no qcow2
    magic), ``size`` bytes if given."""
    data = path.read_bytes()
    if fmt == "raw" or data[:4] != c.MAGIC:
        return data[:size].ljust(size, b"\0") if size is not None else data
    version, bits, virtual = struct.unpack_from(">I", data, 4)[0], *struct.unpack_from(">IQ", data, 20)
    l1_size, l1_at = struct.unpack_from(">IQ", data, 36)
    cs = 1 << bits
    header_length = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    zstd = version >= 3 and header_length >= 105 and data[104] == 1
    out = bytearray(virtual)
    below = backing_of(path)
    if below is not None:
        out[:] = reference(below[0], virtual, below[1])
    x = 62 - (bits - 8)
    for g in range(-(-virtual // cs)):
        l1_index, l2_index = divmod(g, cs // 8)
        table = _u64(data, l1_at + 8 * l1_index) & c.L1_OFFSET_MASK if l1_index < l1_size else 0
        if not table:
            continue
        entry = _u64(data, table + 8 * l2_index)
        start, end = g * cs, min(virtual, (g + 1) * cs)
        if entry & c.L2_COMPRESSED:
            host = entry & ((1 << x) - 1)
            length = (((entry >> x) & ((1 << (62 - x)) - 1)) + 1) * 512 - (host & 511)
            blob = data[host : host + length]
            try:
                if zstd:
                    block = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
                else:
                    block = zlib.decompressobj(-12).decompress(blob, cs)
            except (zlib.error, zstandard.ZstdError):
                block = b""
            # a cluster that cannot be read may only be one that an upper layer hides
            out[start:end] = block[: end - start] if len(block) >= cs else UNREADABLE[: end - start]
        elif entry & c.L2_ZERO:
            out[start:end] = bytes(end - start)
        elif entry & c.L2_OFFSET_MASK:
            host = entry & c.L2_OFFSET_MASK
            out[start:end] = data[host : host + end - start].ljust(end - start, b"\0")
    return bytes(out[:size].ljust(size, b"\0")) if size is not None else bytes(out)


# ------------------------------------------------------------------------------------------------
# small valid images


def _pattern(size: int, seed: int) -> bytes:
    """Random clusters, text clusters and zero clusters, so every kind of L2 entry appears."""
    rng = np.random.default_rng(seed)
    data = np.zeros(size, dtype=np.uint8)
    text = np.frombuffer((b"qcow2 fuzz text, quite compressible; " * 200)[:UNIT], dtype=np.uint8)
    for unit in range(size // UNIT):
        if unit % 5 == 1:
            data[unit * UNIT : (unit + 1) * UNIT] = rng.integers(0, 256, UNIT, dtype=np.uint8)
        elif unit % 5 in (2, 3):
            data[unit * UNIT : (unit + 1) * UNIT] = np.roll(text, unit)
    return data.tobytes()


def _tables(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(cluster size, [(L1 index, L2 table offset)]) of an image, as far as it can be followed
    (a damaged one too: only tables that lie whole inside the file, at most 64)."""
    bits = min(max(int.from_bytes(data[20:24], "big"), 9), 21)
    cs = 1 << bits
    l1_size, l1_at = struct.unpack_from(">IQ", data.ljust(48, b"\0"), 36)
    found = []
    for i in range(min(l1_size, 64, max(0, (len(data) - l1_at) // 8))):
        table = _u64(data, l1_at + 8 * i) & c.L1_OFFSET_MASK
        if table and table + cs <= len(data):
            found.append((i, table))
    return cs, found


def _slots(data: bytes, table: int, cs: int, data_only: bool = True) -> list[int]:
    """Slots of an L2 table holding a data cluster (or, with ``data_only`` false, anything)."""
    entries = [_u64(data, table + 8 * k) for k in range(cs // 8)]
    return [k for k, e in enumerate(entries) if e & c.L2_OFFSET_MASK and not e & (c.L2_COMPRESSED | c.L2_ZERO)]


def compress_clusters(path: Path, algorithm: str, every: int = 2) -> None:
    """Turn every ``every``-th data cluster of a v3 image into a compressed one (appended)."""
    data = bytearray(path.read_bytes())
    cs, tables = _tables(bytes(data))
    bits = cs.bit_length() - 1
    x = 62 - (bits - 8)
    if algorithm == "zstd":
        struct.pack_into(">Q", data, 72, _u64(data, 72) | 1 << 3)
        data[104] = 1
    n = 0
    for _, table in tables:
        for slot in range(cs // 8):
            entry = _u64(data, table + 8 * slot)
            host = entry & c.L2_OFFSET_MASK
            if not host or entry & c.L2_ZERO:
                continue
            n += 1
            if n % every:
                continue
            block = bytes(data[host : host + cs])
            if algorithm == "zstd":
                blob = zstandard.ZstdCompressor(level=3).compress(block)
            else:
                packer = zlib.compressobj(6, zlib.DEFLATED, -12)
                blob = packer.compress(block) + packer.flush()
            at = len(data) + 3  # compressed data need not be aligned
            data += bytes(3) + blob
            sectors = -(-(at % 512 + len(blob)) // 512)
            struct.pack_into(">Q", data, table + 8 * slot, c.L2_COMPRESSED | (sectors - 1) << x | at)
    data += bytes(-len(data) % 512)
    path.write_bytes(bytes(data))


def _build(folder: Path) -> dict[str, list[str]]:
    """The valid cases: each a list of files, the first the one to open (the others it needs)."""
    size = 256 << 10
    base, modified = _pattern(size, 1), _pattern(size + (64 << 10), 2)
    (folder / "base.raw").write_bytes(base)
    (folder / "modified.raw").write_bytes(modified)
    src = folder / "modified.raw"

    def qcow2(name: str, bits: int, version: int = 3, backing: tuple[str, str] | None = None) -> None:
        n = -(-len(modified) // (1 << bits))
        write_qcow2(
            folder / name, src, np.arange(n), size=len(modified), cluster_bits=bits, version=version, backing=backing
        )

    qcow2("v3-4k.qcow2", 12)
    qcow2("v2-512.qcow2", 9, version=2)
    qcow2("v3-64k.qcow2", 16)
    qcow2("over-raw.qcow2", 12, backing=("base.raw", "raw"))
    qcow2("zlib.qcow2", 12)
    compress_clusters(folder / "zlib.qcow2", "zlib")
    qcow2("zstd.qcow2", 13)
    compress_clusters(folder / "zstd.qcow2", "zstd")
    qcow2("mid.qcow2", 12, backing=("base.raw", "raw"))
    qcow2("top.qcow2", 9, backing=("mid.qcow2", "qcow2"))
    return {
        "v3-4k": ["v3-4k.qcow2"],
        "v2-512": ["v2-512.qcow2"],
        "v3-64k": ["v3-64k.qcow2"],
        "over-raw": ["over-raw.qcow2", "base.raw"],
        "zlib": ["zlib.qcow2"],
        "zstd": ["zstd.qcow2"],
        "chain": ["top.qcow2", "mid.qcow2", "base.raw"],
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    folder = tmp_path_factory.mktemp("qcow2-originals")
    cases = _build(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    ORIGINALS.update(files)
    for name, names in cases.items():  # the builders and the reference agree on valid images
        top = folder / names[0]
        with Qcow2Source().open(top, kind="disk", options={}) as image:
            assert image.data.tobytes() == reference(top), name
    return folder, cases


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where damaged cases are written; holds the odd things a backing name may point at."""
    folder = tmp_path_factory.mktemp("qcow2-fuzz")
    (folder / "a-directory").mkdir()
    os.mkfifo(folder / "a-fifo")
    return folder


# ------------------------------------------------------------------------------------------------
# mutations

INTERESTING = (0, 1, 2, 8, 9, 12, 16, 21, 22, 63, 64, 72, 104, 105, 112, 512, 4096, 65536)
INTERESTING += (2**31, 2**32 - 1, 2**47, 2**52, 2**62, 2**63, 2**64 - 1)


def _value(draw: Any, old: int, width: int) -> int:
    value = draw(
        st.one_of(
            st.sampled_from(INTERESTING),
            st.integers(-4, 4).map(lambda d: old + d),
            st.integers(0, 8 * width - 1).map(lambda bit: old ^ (1 << bit)),
            st.integers(0, 2 ** (8 * width) - 1),
        )
    )
    return value % 2 ** (8 * width)


def _l2_value(draw: Any, data: bytes, cs: int, tables: list[tuple[int, int]], old: int) -> int:
    """An L2 entry: another entry's, compressed, zero, pointing at metadata, or damaged."""
    bits = cs.bit_length() - 1
    x = 62 - (bits - 8)
    l1_at = struct.unpack_from(">Q", data, 40)[0]
    choice = draw(st.sampled_from(["other", "compressed", "zero", "metadata", "past", "bits", "value"]))
    if choice == "other" and tables:
        _, table = draw(st.sampled_from(tables))
        return _u64(data, table + 8 * draw(st.integers(0, cs // 8 - 1)))
    if choice == "compressed":
        host = draw(st.integers(0, len(data) + 4096))
        return c.L2_COMPRESSED | draw(st.integers(0, 7)) << x | host & ((1 << x) - 1)
    if choice == "zero":
        return old | c.L2_ZERO
    if choice == "metadata":
        return c.L2_COPIED | draw(st.sampled_from([0, l1_at, *(t for _, t in tables)]))
    if choice == "past":
        return c.L2_COPIED | (len(data) // cs + draw(st.integers(0, 2))) * cs
    if choice == "bits":
        return old ^ (1 << draw(st.integers(0, 63)))
    return _value(draw, old, 8)


def _extensions(draw: Any, backing_format: bytes | None) -> bytes:
    """A fresh extension area: known and unknown extensions, odd lengths, maybe no end marker."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from([c.EXT_BACKING_FORMAT, c.EXT_FEATURE_NAMES, 0x12345678, c.EXT_BITMAPS]))
        body = draw(st.binary(max_size=200))
        if kind == c.EXT_BACKING_FORMAT:
            body = draw(st.sampled_from([b"raw", b"qcow2", b"vmdk", b"", b"\xff\xfe"]))
        elif kind == c.EXT_FEATURE_NAMES:
            body = b"".join(
                struct.pack(">BB46s", draw(st.integers(0, 3)), draw(st.integers(0, 255)), b"name")
                for _ in range(draw(st.integers(0, 5)))
            )
        length = len(body) if draw(st.integers(0, 4)) else draw(st.sampled_from([len(body) + 1, 2**32 - 1, 0]))
        out += struct.pack(">II", kind, length) + body + bytes(-len(body) % 8)
    if backing_format is not None and draw(st.booleans()):
        out += struct.pack(">II", c.EXT_BACKING_FORMAT, len(backing_format)) + backing_format
        out += bytes(-len(backing_format) % 8)
    return out + (struct.pack(">II", c.EXT_END, 0) if draw(st.integers(0, 5)) else b"")


BACKING_NAMES = [
    "missing.raw",
    "a-directory",
    "a-fifo",
    "/dev/zero",
    "nbd://example.invalid/disk",
    "json:{}",
    "base\0.raw",
    "x" * 1023,
    "../" * 20 + "base.raw",
    "SELF",
    "base.raw",
    "mid.qcow2",
]


def _mutate(draw: Any, data: bytes, name: str, log: list[str]) -> bytes:
    kind = draw(st.sampled_from(["header", "l1", "l2", "l2", "extensions", "backing", "bytes", "cut"]))
    if len(data) < 512 and kind not in ("bytes", "cut"):
        kind = "cut"
    log.append(f"{kind} of {name}")
    try:
        return _mutation(draw, bytearray(data), name, kind)
    except (struct.error, IndexError, ValueError):  # an earlier mutation left too little to follow
        return data


def _mutation(draw: Any, data: bytearray, name: str, kind: str) -> bytes:
    cs, tables = _tables(bytes(data))
    if kind == "header":
        offset, width = HEADER_FIELDS[draw(st.sampled_from(sorted(HEADER_FIELDS)))]
        old = int.from_bytes(data[offset : offset + width], "big")
        data[offset : offset + width] = _value(draw, old, width).to_bytes(width, "big")
    elif kind == "l1":
        l1_size, l1_at = struct.unpack_from(">IQ", data, 36)
        index = draw(st.integers(0, min(max(l1_size - 1, 0), 64)))
        if l1_at + 8 * index + 8 > len(data):
            return bytes(data)
        old = _u64(data, l1_at + 8 * index)
        new = draw(st.sampled_from([t | c.L2_COPIED for _, t in tables] + [0, old + cs, old + 512, old | 1]))
        struct.pack_into(">Q", data, l1_at + 8 * index, new % 2**64)
    elif kind == "l2" and tables:
        _, table = draw(st.sampled_from(tables))
        slot = draw(st.integers(0, cs // 8 - 1))
        old = _u64(data, table + 8 * slot)
        struct.pack_into(">Q", data, table + 8 * slot, _l2_value(draw, bytes(data), cs, tables, old))
    elif kind == "extensions":
        header_length = 72 if data[7] == 2 else struct.unpack_from(">I", data, 100)[0]
        name_at, name_size = struct.unpack_from(">QI", data, 8)
        keep = bytes(data[name_at : name_at + name_size]) if 0 < name_at < cs else b""
        area = _extensions(draw, b"raw" if keep else None)
        room = cs - header_length - len(keep)
        if room <= 0 or cs > len(data):
            return bytes(data)
        data[header_length : header_length + len(area[:room])] = area[:room]
        if keep:  # the name stays right after the extensions
            at = header_length + len(area[:room])
            data[at : at + len(keep)] = keep
            struct.pack_into(">Q", data, 8, at)
    elif kind == "backing":
        chosen = draw(st.sampled_from(BACKING_NAMES)).replace("SELF", name).encode()
        name_at = struct.unpack_from(">Q", data, 8)[0] or 0x200
        if name_at >= min(cs, len(data)):
            return bytes(data)
        chosen = chosen[: min(cs, len(data)) - name_at]
        data[name_at : name_at + len(chosen)] = chosen
        struct.pack_into(">QI", data, 8, name_at, len(chosen))
    elif kind == "bytes" and data:
        end = min(len(data), draw(st.sampled_from([cs, 4 * cs, len(data)])))
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, end - 1))] ^= draw(st.integers(1, 255))
    elif kind == "cut":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] if draw(st.booleans()) else data + bytes(draw(st.sampled_from([1, 511, cs])))
    return bytes(data)


class Damaged:
    """A damaged case: the files to write, with a short repr (the case and what was done)."""

    def __init__(self, case: list[str], files: dict[str, bytes], log: list[str]) -> None:
        self.case, self.files, self.log = case, files, log

    def __repr__(self) -> str:
        return f"Damaged({self.case[0]}: {'; '.join(self.log)})"


#: the valid images, by file name (filled by the ``built`` fixture; strategies read it by name so
#: that hypothesis never prints whole files)
ORIGINALS: dict[str, bytes] = {}


@st.composite
def damaged_images(draw: Any, cases: dict[str, list[str]]) -> Damaged:
    case = cases[draw(st.sampled_from(sorted(cases)))]
    written = {name: ORIGINALS[name] for name in case}
    log: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        target = case[0] if len(case) < 3 or draw(st.integers(0, 3)) else case[1]
        written[target] = _mutate(draw, written[target], target, log)
    return Damaged(case, written, log)


# ------------------------------------------------------------------------------------------------
# the contract, and what an accepted image must satisfy


def _bound(files: dict[str, bytes], top: bytes) -> int:
    """The design's memory bound: tables and the cluster map proportional to the files (an L2
    entry is 8 bytes of file and about 40 bytes of arrays; each cluster serves once), plus the
    hints, 8 bytes for each 4 KiB unit the top layer's clusters cover (a cluster of up to 2 MiB
    per 8-byte L2 entry); the guest image itself is a file mapping, not counted."""
    total = sum(len(d) for d in files.values())
    bits = int.from_bytes(top[20:24], "big") if len(top) >= 24 else 16
    per_entry = max(1, (1 << min(max(bits, 9), 21)) // UNIT)
    return (8 << 20) + 64 * total + 3 * 8 * per_entry * (len(top) // 8)


def _check_accepted(image: Any, top: Path) -> None:
    expected = reference(top)
    assert image.size == len(expected)
    got = image.data.tobytes()
    assert got == expected, f"first differing byte at {next(i for i in range(len(got)) if got[i] != expected[i])}"
    for start, length in image.holes.tolist():
        assert not image.data[start : start + length].any(), f"a hole at {start} holds data"
    below_of = backing_of(top)
    if image.hints is not None and below_of is not None:
        below = np.frombuffer(reference(below_of[0], image.size, below_of[1]), dtype=np.uint8)
        n = -(-image.size // UNIT)
        padded = np.zeros(n * UNIT, dtype=np.uint8)
        padded[: image.size] = image.data
        other = np.zeros(n * UNIT, dtype=np.uint8)
        other[: image.size] = below
        differ = np.flatnonzero((padded.reshape(n, UNIT) != other.reshape(n, UNIT)).any(axis=1))
        assert np.isin(differ, image.hints).all(), "a unit that differs from the backing file is not hinted"


def _open(path: Path) -> Any:
    return Qcow2Source().open(path, kind="disk", options={})


@fuzz_settings(120)
@given(data=st.data())
def test_fuzz_qcow2(built: tuple[Path, dict], work: Path, data: st.DataObject) -> None:
    damaged = data.draw(damaged_images(built[1]))
    for name, content in damaged.files.items():
        (work / name).write_bytes(content)
    top = work / damaged.case[0]
    bound = _bound(damaged.files, damaged.files[damaged.case[0]])
    result = check_untrusted("qcow2", lambda: _open(top), memory=bound, seconds=10)
    if isinstance(result, VmdeltaError):
        assert "\n" not in str(result)
        return
    with result as image:
        _check_accepted(image, top)


# ------------------------------------------------------------------------------------------------
# what the fuzzers found, one regression test each


def _case(built: tuple[Path, dict], work: Path, name: str) -> tuple[Path, bytearray]:
    folder, cases = built
    for file in cases[name]:
        shutil.copy(folder / file, work / file)
    return work / cases[name][0], bytearray(ORIGINALS[cases[name][0]])


def test_one_l2_table_listed_by_every_l1_entry_is_refused(built: tuple, work: Path) -> None:
    """Was accepted: a 384 KiB file stood for a 64 GiB image whose every 512 MiB was the same
    table, and opening it wrote 64 GiB into a temporary file (a hang, then a full disk)."""
    path, data = _case(built, work, "v3-64k")
    cs, tables = _tables(bytes(data))
    (_, table), l1_at = tables[0], struct.unpack_from(">Q", data, 40)[0]
    n = 128
    struct.pack_into(">Q", data, 24, n * (cs // 8) * cs)  # 64 GiB
    struct.pack_into(">I", data, 36, n)
    data[l1_at : l1_at + 8 * n] = struct.pack(">Q", table | c.L2_COPIED) * n
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"the L2 table of L1 entry 1 \(byte {table}\) is also the L2 table of L1"):
        _open(path)


@pytest.mark.parametrize("target", ["data", "l2", "l1"])
def test_a_data_cluster_serving_twice_is_refused(built: tuple, work: Path, target: str) -> None:
    """Was accepted: the same host cluster read for two guest clusters, or a table read as data."""
    path, data = _case(built, work, "v3-4k")
    cs, tables = _tables(bytes(data))
    _, table = tables[0]
    first, second = _slots(bytes(data), table, cs)[:2]
    point = {
        "data": _u64(data, table + 8 * first),
        "l2": table | c.L2_COPIED,
        "l1": struct.unpack_from(">Q", data, 40)[0] | c.L2_COPIED,
    }[target]
    struct.pack_into(">Q", data, table + 8 * second, point)
    path.write_bytes(bytes(data))
    owner = {"data": f"the data of guest offset {first * cs}", "l2": "the L2 table of L1 entry 0", "l1": "the L1 table"}
    at = table + 8 * second
    with pytest.raises(
        FormatError, match=f"data of guest offset {second * cs} .* is also {owner[target]}.*offset {at}"
    ):
        _open(path)


def test_two_compressed_clusters_from_the_same_bytes_are_refused(built: tuple, work: Path) -> None:
    path, data = _case(built, work, "zlib")
    cs, tables = _tables(bytes(data))
    _, table = tables[0]
    entries = [_u64(data, table + 8 * k) for k in range(cs // 8)]
    compressed = [k for k, e in enumerate(entries) if e & c.L2_COMPRESSED]
    struct.pack_into(">Q", data, table + 8 * compressed[1], entries[compressed[0]])
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"compressed data of guest offset .* serves another cluster too"):
        _open(path)


def test_a_header_cluster_full_of_extensions_is_read_quickly(built: tuple, work: Path) -> None:
    """Was one construct object per extension: a 1 MiB first cluster of empty extensions took
    3.5 seconds and 30 MiB to open (a 2 MiB one, seven seconds)."""
    path, data = _case(built, work, "v3-4k")
    cs = 1 << 20
    struct.pack_into(">I", data, 20, 20)
    count = (cs - 120) // 8
    data = data[:112] + struct.pack(">II", 0x12345678, 0) * count + bytes(cs - 112 - 8 * count)
    path.write_bytes(bytes(data))  # the L1 table is not aligned to the new cluster size: refused
    started = time.monotonic()
    with pytest.raises(FormatError, match="L1 table offset"):
        _open(path)
    assert time.monotonic() - started < 1.5
    result = check_untrusted("qcow2", lambda: _open(path), memory=4 << 20, seconds=30)
    assert isinstance(result, FormatError)


def test_extensions_without_an_end_marker_name_where_they_run_out(built: tuple, work: Path) -> None:
    path, data = _case(built, work, "v3-4k")
    struct.pack_into(">II", data, 112, 0x12345678, 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(
        FormatError, match=r"header extensions: one of type 0x12345678 and 4096 bytes .*at byte offset 112"
    ):
        _open(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a-fifo", "is a FIFO"),  # opening it blocked forever
        ("a-directory", "is a directory"),  # was "cannot present ... as an image: Is a directory"
        ("/dev/zero", "is a character device"),  # was read as an empty raw file
    ],
)
def test_a_backing_file_that_is_not_a_regular_file_is_refused(
    built: tuple, work: Path, name: str, message: str
) -> None:
    path, data = _case(built, work, "over-raw")
    name_at = struct.unpack_from(">Q", data, 8)[0]
    data[name_at : name_at + len(name)] = name.encode()
    struct.pack_into(">I", data, 16, len(name))
    path.write_bytes(bytes(data))
    result = check_untrusted("qcow2", lambda: _open(path), seconds=5)
    assert isinstance(
        result, ConfigError
    ) and f"its backing file {work / name if name[0] != '/' else name} {message}" in str(result)


def test_a_backing_name_the_system_cannot_look_up_is_a_config_error(built: tuple, work: Path) -> None:
    """Was an OSError (File name too long) escaping from Path.exists."""
    path, data = _case(built, work, "over-raw")
    name_at = struct.unpack_from(">Q", data, 8)[0]
    data[name_at : name_at + 1000] = b"x" * 1000
    struct.pack_into(">I", data, 16, 1000)
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"cannot use its backing file 'x+': File name too long"):
        _open(path)


def test_a_backing_directory_is_refused_before_its_format_is_probed(built: tuple, work: Path) -> None:
    """Without a backing format extension the format is probed by reading the file: a directory
    was an IsADirectoryError escaping, a FIFO a hang."""
    path, data = _case(built, work, "v3-4k")
    struct.pack_into(">QI", data, 8, 0x200, len(b"a-directory"))
    data[0x200 : 0x200 + 11] = b"a-directory"
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"its backing file .*a-directory is a directory"):
        _open(path)


def test_a_backing_name_with_a_nul_byte_is_damage(built: tuple, work: Path) -> None:
    path, data = _case(built, work, "over-raw")
    name_at = struct.unpack_from(">Q", data, 8)[0]
    data[name_at + 4] = 0
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"the backing file name 'base\\x00raw' holds a NUL byte"):
        _open(path)


def test_a_zero_cluster_in_a_version_2_image_is_refused(built: tuple, work: Path) -> None:
    """QEMU calls it corruption ("Zero cluster entry found in pre-v3 image"); it was read as zeros."""
    path, data = _case(built, work, "v2-512")
    _, tables = _tables(bytes(data))
    _, table = tables[0]
    struct.pack_into(">Q", data, table, _u64(data, table) | c.L2_ZERO)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"is a zero cluster, which version 2 does not have .*at byte offset {table}"):
        _open(path)


def test_damaged_refcounts_change_nothing(built: tuple, work: Path) -> None:
    path, data = _case(built, work, "v3-4k")
    expected = reference(path)
    rt_at, rt_clusters = struct.unpack_from(">QI", data, 48)
    data[rt_at : rt_at + 4096 * rt_clusters] = b"\xff" * (4096 * rt_clusters)
    path.write_bytes(bytes(data))
    with _open(path) as image:
        assert image.data.tobytes() == expected
