"""``vmdelta export --elijah`` and ``vmdelta import``: the original system's overlay package.

The packages the exporter writes are read here by a reader of this file's own, written from the
original layout (``shared/reference/elijah-notes.md``: big-endian ``u64 offset, u16 length,
u8 ref|type`` records, refs in the high nibble, SELF values ``(offset << 1) | 1 or 2``; the zip
comment, member names and meta keys of the original), never through the exporter's code.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
import zipfile
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from samples import sample_pair, write_pair

from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.cli import main
from vmdelta_core.errors import VmdeltaError
from vmdelta_core.fuzzing import check_untrusted, fuzz_settings
from vmdelta_core.interop import import_elijah

CHUNK = 4096
# the original's constants, as the notes give them (ref in the high nibble, type in the low)
MEMORY, DISK, MEMORY_LIVE, DISK_LIVE = 0x01, 0x02, 0x03, 0x04
RAW, XDELTA, SELF, BASE_DISK, BASE_MEM, ZEROS, BSDIFF, SELF_HASH, XOR = (
    0x10,
    0x20,
    0x30,
    0x40,
    0x50,
    0x60,
    0x70,
    0x80,
    0x90,
)
COMMENT = b"Cloudlet VM overlay"


# --------------------------------------------------------------------------------------------
# an independent reader of packages
# --------------------------------------------------------------------------------------------


def parse_items(stream: bytes) -> list[tuple[int, int, int, int, object]]:
    """(offset, length, ref, type, data) of each record of a blob's item stream."""
    items = []
    pos = 0
    while pos < len(stream):
        offset, length, info = struct.unpack_from("!QHB", stream, pos)
        pos += 11
        ref, typ = info & 0xF0, info & 0x0F
        data: object = None
        if ref in (RAW, XDELTA, BSDIFF, XOR):
            (size,) = struct.unpack_from("!Q", stream, pos)
            data = stream[pos + 8 : pos + 8 + size]
            pos += 8 + size
        elif ref in (SELF, BASE_DISK, BASE_MEM):
            (data,) = struct.unpack_from("!Q", stream, pos)
            pos += 8
        elif ref == SELF_HASH:
            data = stream[pos : pos + 32]
            pos += 32
        else:
            assert ref == ZEROS, f"unknown ref {ref:#x}"
        if typ in (MEMORY_LIVE, DISK_LIVE):
            pos += 2
        items.append((offset, length, ref, typ, data))
    assert pos == len(stream)
    return items


def rebuild_from_package(package: Path, base_memory: bytes, base_disk: bytes) -> tuple[bytes, bytes]:
    """The memory and disk the package rebuilds, checking its layout on the way."""
    with zipfile.ZipFile(package) as z:
        assert z.comment == COMMENT
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        meta = msgpack.unpackb(z.read("overlay-meta"), raw=False)
        blobs = [(entry, z.read(entry["overlay_name"])) for entry in meta["overlay_files"]]
    assert set(meta) >= {"base_vm_sha256", "resumed_vm_disk_size", "resumed_vm_memory_size", "overlay_files"}
    images = {
        MEMORY: bytearray(base_memory[: meta["resumed_vm_memory_size"]].ljust(meta["resumed_vm_memory_size"], b"\0")),
        DISK: bytearray(base_disk[: meta["resumed_vm_disk_size"]].ljust(meta["resumed_vm_disk_size"], b"\0")),
    }
    by_index: dict[int, bytes] = {}
    for entry, compressed in blobs:
        assert entry["overlay_compression"] == 1  # LZMA
        assert entry["overlay_size"] == len(compressed)
        items = parse_items(lzma.decompress(compressed))
        assert entry["memory_chunk"] == [o // CHUNK for o, _, _, t, _ in items if t in (MEMORY, MEMORY_LIVE)]
        assert entry["disk_chunk"] == [o // CHUNK for o, _, _, t, _ in items if t in (DISK, DISK_LIVE)]
        for offset, length, ref, typ, data in items:
            kind = MEMORY if typ in (MEMORY, MEMORY_LIVE) else DISK
            if ref == RAW:
                content = data
            elif ref == ZEROS:
                content = bytes(length)
            elif ref == BASE_MEM:
                content = base_memory[data : data + length]
            elif ref == BASE_DISK:
                content = base_disk[data : data + length]
            elif ref == SELF:
                content = by_index[data]
            else:
                raise AssertionError(f"the exporter wrote ref {ref:#x}, which this reader cannot decode")
            assert len(content) == length
            images[kind][offset : offset + length] = content
            by_index[(offset << 1) | kind] = content
    return bytes(images[MEMORY]), bytes(images[DISK])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_overlay(folder: Path, pairs: list[tuple[str, Path, Path]], unit_size: int = CHUNK) -> Path:
    """An overlay of raw-file images, raw units only (what the core alone has)."""
    output = folder / "vm.vmdo"
    create_overlay(
        CreateConfig(
            output=output,
            images=[
                ImageSpec(kind, base, modified, format="file", encoders=("raw",)) for kind, base, modified in pairs
            ],
            unit_size=unit_size,
            cache_dir=folder / "cache",
        )
    )
    return output


@pytest.fixture
def vm(tmp_path: Path) -> dict[str, Path]:
    """A small VM (memory and a grown disk, every kind of change) and its overlay."""
    memory = write_pair(tmp_path, "memory", *sample_pair(seed=5, units=48))
    disk = write_pair(tmp_path, "disk", *sample_pair(seed=6, units=40, grow=3000))
    overlay = make_overlay(tmp_path, [("memory", *memory), ("disk", *disk)])
    return {
        "memory_base": memory[0],
        "memory": memory[1],
        "disk_base": disk[0],
        "disk": disk[1],
        "overlay": overlay,
        "folder": tmp_path,
    }


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def export(vm: dict[str, Path], capsys: pytest.CaptureFixture[str], package: Path, *extra: object) -> None:
    code, err = run(capsys, "export", "-q", vm["overlay"], "--elijah", package, "--base-disk", vm["disk_base"], *extra)
    assert code == 0, err


def import_args(vm: dict[str, Path], package: Path, output: Path) -> list[object]:
    return ["import", "-q", package, "--base-memory", vm["memory_base"], "--base-disk", vm["disk_base"], "-o", output]


def apply_and_read(vm: dict[str, Path], overlay: Path, capsys: pytest.CaptureFixture[str]) -> tuple[bytes, bytes]:
    folder = overlay.parent
    code, err = run(
        capsys,
        "apply",
        "-q",
        overlay,
        "--memory",
        vm["memory_base"],
        folder / "memory.out",
        "--disk",
        vm["disk_base"],
        folder / "disk.out",
    )
    assert code == 0, err
    return (folder / "memory.out").read_bytes(), (folder / "disk.out").read_bytes()


# --------------------------------------------------------------------------------------------
# export -> independent reader, export -> import -> apply
# --------------------------------------------------------------------------------------------


def test_exported_package_rebuilds_the_vm_when_read_by_the_original_layout(vm, capsys):
    package = vm["folder"] / "out.zip"
    export(vm, capsys, package)
    memory, disk = rebuild_from_package(package, vm["memory_base"].read_bytes(), vm["disk_base"].read_bytes())
    assert memory == vm["memory"].read_bytes()
    assert disk == vm["disk"].read_bytes()
    with zipfile.ZipFile(package) as z:
        meta = msgpack.unpackb(z.read("overlay-meta"), raw=False)
        names = z.namelist()
    import hashlib

    assert meta["base_vm_sha256"] == hashlib.sha256(vm["disk_base"].read_bytes()).hexdigest()
    assert meta["resumed_vm_disk_size"] == vm["disk"].stat().st_size
    assert meta["resumed_vm_memory_size"] == vm["memory"].stat().st_size
    assert sorted(names) == sorted(["overlay-meta", *(e["overlay_name"] for e in meta["overlay_files"])])
    assert all(e["overlay_name"].startswith("overlay-blob_") for e in meta["overlay_files"])


def test_small_blobs_split_the_items_and_the_package_is_the_same_every_time(vm, capsys):
    first, second = vm["folder"] / "a.zip", vm["folder"] / "b.zip"
    export(vm, capsys, first, "--blob-size", CHUNK)
    export(vm, capsys, second, "--blob-size", CHUNK)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as z:
        assert len(msgpack.unpackb(z.read("overlay-meta"))["overlay_files"]) > 3
    memory, disk = rebuild_from_package(first, vm["memory_base"].read_bytes(), vm["disk_base"].read_bytes())
    assert (memory, disk) == (vm["memory"].read_bytes(), vm["disk"].read_bytes())


def test_export_import_apply_is_byte_exact(vm, capsys):
    package, back = vm["folder"] / "out.zip", vm["folder"] / "back.vmdo"
    export(vm, capsys, package)
    code, err = run(capsys, *import_args(vm, package, back))
    assert code == 0, err
    assert apply_and_read(vm, back, capsys) == (vm["memory"].read_bytes(), vm["disk"].read_bytes())


@pytest.mark.slow
def test_real_fixtures_round_trip(realistic, tmp_path, capsys):
    """The real QEMU 7.2 capture: the memory stream and the ext4 disk as plain files."""
    vm = {
        "memory_base": realistic / "base.mem",
        "memory": realistic / "modified.mem",
        "disk_base": realistic / "base.img",
        "disk": realistic / "modified.img",
        "folder": tmp_path,
    }
    vm["overlay"] = make_overlay(
        tmp_path, [("memory", vm["memory_base"], vm["memory"]), ("disk", vm["disk_base"], vm["disk"])]
    )
    package, back = tmp_path / "out.zip", tmp_path / "back.vmdo"
    export(vm, capsys, package, "--level", 0)
    base_memory, base_disk = vm["memory_base"].read_bytes(), vm["disk_base"].read_bytes()
    memory, disk = rebuild_from_package(package, base_memory, base_disk)
    assert memory == vm["memory"].read_bytes()
    assert disk == vm["disk"].read_bytes()
    del memory, disk, base_memory, base_disk
    code, err = run(capsys, *import_args(vm, package, back))
    assert code == 0, err
    memory, disk = apply_and_read(vm, back, capsys)
    assert memory == vm["memory"].read_bytes()
    assert disk == vm["disk"].read_bytes()


# --------------------------------------------------------------------------------------------
# packages made by hand: what the original could write that the exporter does not
# --------------------------------------------------------------------------------------------


def item(offset: int, length: int, info: int, tail: bytes = b"") -> bytes:
    return struct.pack("!QHB", offset, length, info) + tail


def u64(value: int) -> bytes:
    return struct.pack("!Q", value)


def write_package(
    path: Path,
    vm: dict[str, Path],
    blobs: list[tuple[bytes, list[int], list[int]]],
    *,
    meta_bytes: bytes | None = None,
    extra: dict[str, bytes] | None = None,
    compress=lzma.compress,
    bin_keys: bool = False,
    sha: str | None = None,
) -> Path:
    """A package of ``blobs`` (item stream, memory chunks, disk chunks) against ``vm``'s bases,
    for the modified sizes of ``vm``."""
    import hashlib

    members = {}
    files = []
    for k, (stream, memory_chunks, disk_chunks) in enumerate(blobs, start=1):
        data = compress(stream)
        name = f"overlay-blob_{k}"
        members[name] = data
        files.append(
            {
                "overlay_name": name,
                "overlay_compression": 1,
                "overlay_size": len(data),
                "memory_chunk": memory_chunks,
                "disk_chunk": disk_chunks,
            }
        )
    meta = {
        "base_vm_sha256": sha or hashlib.sha256(vm["disk_base"].read_bytes()).hexdigest(),
        "resumed_vm_disk_size": vm["disk"].stat().st_size,
        "resumed_vm_memory_size": vm["memory"].stat().st_size,
        "overlay_files": files,
    }
    if bin_keys:  # how a Python 2 writer with use_bin_type would have it
        meta = _bytes_keys(meta)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.comment = COMMENT
        z.writestr("overlay-meta", meta_bytes if meta_bytes is not None else msgpack.packb(meta, use_bin_type=True))
        for name, data in {**members, **(extra or {})}.items():
            z.writestr(name, data)
    return path


def _bytes_keys(value):
    if isinstance(value, dict):
        return {k.encode(): _bytes_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_keys(v) for v in value]
    return value


def expected_images(vm: dict[str, Path]) -> tuple[bytearray, bytearray]:
    """The bases at the modified sizes: what a package of no items rebuilds."""
    m, d = vm["memory"].stat().st_size, vm["disk"].stat().st_size
    return (
        bytearray(vm["memory_base"].read_bytes()[:m].ljust(m, b"\0")),
        bytearray(vm["disk_base"].read_bytes()[:d].ljust(d, b"\0")),
    )


def test_items_in_any_order_with_self_references_forward_import_byte_exact(vm, capsys):
    """The original ordered items by hash: a self reference may name an item that comes later in
    vmdelta's order (here a memory unit the same as a disk unit), and items arrive unsorted."""
    memory, disk = expected_images(vm)
    page = bytes(np.random.default_rng(1).integers(0, 256, CHUNK, dtype=np.uint8))
    disk[5 * CHUNK : 6 * CHUNK] = page
    memory[2 * CHUNK : 3 * CHUNK] = page
    memory[7 * CHUNK : 8 * CHUNK] = page
    base_disk = vm["disk_base"].read_bytes()
    memory[9 * CHUNK : 10 * CHUNK] = base_disk[512 : 512 + CHUNK]  # a sector-aligned base match
    memory[3 * CHUNK : 4 * CHUNK] = bytes(CHUNK)
    stream = b"".join(
        [
            item(7 * CHUNK, CHUNK, SELF | MEMORY, u64(((2 * CHUNK) << 1) | 1)),  # names a later item
            item(5 * CHUNK, CHUNK, RAW | DISK, u64(CHUNK) + page),
            item(2 * CHUNK, CHUNK, SELF | MEMORY, u64(((5 * CHUNK) << 1) | 2)),  # memory -> disk
            item(9 * CHUNK, CHUNK, BASE_DISK | MEMORY, u64(512)),
            item(3 * CHUNK, CHUNK, ZEROS | MEMORY_LIVE, struct.pack("!H", 4)),
        ]
    )
    package = write_package(vm["folder"] / "p.zip", vm, [(stream, [7, 2, 9, 3], [5])], bin_keys=True)
    back = vm["folder"] / "back.vmdo"
    code = main([str(a) for a in [*import_args(vm, package, back)[:-2], "--json", "-o", back]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    # memory 2 names disk 5, which comes later: it holds the page RAW, and memory 7 names it
    assert report["self_references_stored_raw"] == {"memory": 1, "disk0": 0}
    assert apply_and_read(vm, back, capsys) == (bytes(memory), bytes(disk))


# --------------------------------------------------------------------------------------------
# hostile packages: one line, a non-zero exit, nothing written
# --------------------------------------------------------------------------------------------


def refused(vm, capsys, package: Path, phrase: str, code_wanted: int | None = None) -> None:
    before = set(os.listdir(vm["folder"]))
    out = vm["folder"] / "never.vmdo"
    code, err = run(capsys, *import_args(vm, package, out))
    assert code != 0
    if code_wanted is not None:
        assert code == code_wanted
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmdelta: error: "), err
    assert phrase in lines[0], lines[0]
    assert not out.exists()
    assert set(os.listdir(vm["folder"])) == before


def raw(offset: int, typ: int = MEMORY, length: int = CHUNK) -> bytes:
    return item(offset, length, RAW | typ, u64(length) + bytes(length))


@pytest.mark.parametrize(
    ("blobs", "phrase"),
    [
        pytest.param([(raw(1 << 40), [0], [])], "is not a chunk of the", id="offset-past-the-image"),
        pytest.param([(raw(0), [1 << 28], [])], "chunk past the", id="chunk-listed-past-the-image"),
        pytest.param([(raw(0), [0, 0], [])], "memory chunk twice", id="chunk-listed-twice"),
        pytest.param([(raw(0), [0], []), (raw(CHUNK), [0], [])], "memory chunk twice", id="chunk-listed-in-two-blobs"),
        pytest.param([(raw(100), [0], [])], "is not a chunk of the", id="offset-not-aligned"),
        pytest.param([(raw(0, length=100), [0], [])], "has length 100", id="wrong-length"),
        pytest.param(
            [(item(0, CHUNK, BASE_DISK | MEMORY, u64(1 << 30)), [0], [])], "points outside", id="base-out-of-range"
        ),
        pytest.param([(raw(0) + raw(0), [0, 1], [])], "repeats an earlier item", id="duplicate"),
        pytest.param([(raw(0), [0], []), (raw(0), [1], [])], "repeats an earlier item", id="duplicate-across-blobs"),
        pytest.param(
            [(item(0, CHUNK, SELF | MEMORY, u64((CHUNK << 1) | 1)), [0], [])], "which no item", id="self-to-nothing"
        ),
        pytest.param(
            [
                (
                    item(0, CHUNK, SELF | MEMORY, u64((CHUNK << 1) | 1))
                    + item(CHUNK, CHUNK, SELF | MEMORY, u64((0 << 1) | 1)),
                    [0, 1],
                    [],
                )
            ],
            "loop of self references",
            id="self-loop",
        ),
        pytest.param([(item(0, CHUNK, 0xA0 | MEMORY, u64(0)), [0], [])], "ref 0xa", id="unknown-ref"),
        pytest.param([(item(0, CHUNK, RAW | 0x07), [0], [])], "type 0x7", id="unknown-type"),
        pytest.param([(item(0, CHUNK, RAW | MEMORY, u64(1 << 62)), [0], [])], "-byte payload", id="huge-payload"),
        pytest.param([(raw(0)[:-5], [0], [])], "cut short", id="item-cut-short"),
        pytest.param([(raw(0), [1], [])], "other chunks", id="chunk-list-lies"),
        pytest.param([(raw(0), [0, 1], [])], "other chunks", id="chunk-list-claims-more"),
        pytest.param(
            [(item(0, CHUNK, ZEROS | MEMORY) + item(CHUNK, CHUNK, ZEROS | MEMORY), [0], [])],
            "more items than",
            id="more-than-listed",
        ),
        pytest.param(
            [(item(0, CHUNK, SELF_HASH | MEMORY, bytes(32)), [0], [])], "SELF_HASH", id="self-hash-unsupported"
        ),
    ],
)
def test_hostile_items_are_refused(vm, capsys, blobs, phrase):
    refused(vm, capsys, write_package(vm["folder"] / "bad.zip", vm, blobs), phrase)


def test_zip_bomb_blob_is_refused_without_inflating_it(vm, capsys):
    """64 MiB of zeros in a few KiB, claimed as one item: decompression stops at the item's bound."""
    bomb = lzma.compress(bytes(64 << 20), preset=0)
    assert len(bomb) < 1 << 20
    package = write_package(vm["folder"] / "bomb.zip", vm, [(b"", [0], [])], compress=lambda _: bomb)
    refused(vm, capsys, package, "decompression bomb")


def test_decompressor_memory_is_bounded_by_the_claimed_items(vm, capsys, monkeypatch):
    """The bound is what the claimed items can fill: a blob claiming one item is never
    decompressed past one record's size plus one piece."""
    from vmdelta_core.interop import elijah

    pieces = []
    original = elijah.inflate

    def spy(chunks, bound, where):
        for piece in original(chunks, bound, where):
            pieces.append(len(piece))
            yield piece

    monkeypatch.setattr("vmdelta_core.interop.elijah_import.inflate", spy)
    bomb = lzma.compress(bytes(64 << 20), preset=0)
    refused(vm, capsys, write_package(vm["folder"] / "bomb.zip", vm, [(b"", [0], [])], compress=lambda _: bomb), "bomb")
    assert sum(pieces) <= 4 << 20


@pytest.mark.parametrize(
    ("meta", "phrase"),
    [
        pytest.param(b"\xc1\xc1\xc1", "not valid msgpack", id="not-msgpack"),
        pytest.param(msgpack.packb([1, 2, 3]), "is not a map", id="not-a-map"),
        pytest.param(msgpack.packb({"base_vm_sha256": "00"}), "has no overlay_files", id="missing-keys"),
        pytest.param(msgpack.packb({"a": 1}) + b"\x00", "not valid msgpack", id="trailing-bytes"),
        pytest.param(b"\x91" * 5000 + b"\xc0", "not valid msgpack", id="nested-too-deep"),
        pytest.param(b"\xdd\xff\xff\xff\xff", "not valid msgpack", id="array-claims-4g-entries"),
    ],
)
def test_bad_meta_is_refused(vm, capsys, meta, phrase):
    refused(vm, capsys, write_package(vm["folder"] / "bad.zip", vm, [], meta_bytes=meta), phrase)


def test_meta_values_are_checked(vm, capsys):
    package = write_package(vm["folder"] / "bad.zip", vm, [(raw(0), [0], [])])
    with zipfile.ZipFile(package) as z:
        meta = msgpack.unpackb(z.read("overlay-meta"))
        blob = z.read("overlay-blob_1")
    cases = [
        ({"resumed_vm_memory_size": -1}, "resumed_vm_memory_size is not an integer"),
        ({"resumed_vm_disk_size": 1 << 60}, "resumed_vm_disk_size is not an integer"),
        ({"base_vm_sha256": "not hex"}, "is not a SHA-256"),
        ({"overlay_files": [{**meta["overlay_files"][0], "overlay_compression": 2}]}, "compressed with bzip2"),
        ({"overlay_files": [{**meta["overlay_files"][0], "overlay_size": 5}]}, "holds"),
        ({"overlay_files": [{**meta["overlay_files"][0], "overlay_name": "../../etc/x"}]}, "not a blob member name"),
        ({"overlay_files": [{**meta["overlay_files"][0], "memory_chunk": ["x"]}]}, "not a chunk number"),
        ({"overlay_files": [meta["overlay_files"][0]] * 2}, "names a blob twice"),
    ]
    for change, phrase in cases:
        bad = vm["folder"] / "bad2.zip"
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("overlay-meta", msgpack.packb({**meta, **change}))
            z.writestr("overlay-blob_1", blob)
        refused(vm, capsys, bad, phrase)
        bad.unlink()


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        pytest.param({"../escape": b"x"}, "not a plain file name", id="member-path"),
        pytest.param({"sub/dir": b"x"}, "not a plain file name", id="member-folder"),
        pytest.param({"unnamed-member": b"x"}, "is not a blob that overlay-meta names", id="unlisted-member"),
        pytest.param({"overlay-meta": b"again"}, "appears twice", id="duplicate-member"),
    ],
)
def test_bad_members_are_refused(vm, capsys, extra, phrase):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it is asked to write
        package = write_package(vm["folder"] / "bad.zip", vm, [(raw(0), [0], [])], extra=extra)
    refused(vm, capsys, package, phrase)


def test_deflated_members_and_other_files_are_refused(vm, capsys):
    package = vm["folder"] / "deflated.zip"
    with zipfile.ZipFile(package, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("overlay-meta", msgpack.packb({"overlay_files": []}))
    refused(vm, capsys, package, "compressed in the zip")
    not_zip = vm["folder"] / "not.zip"
    not_zip.write_bytes(b"hello" * 100)
    refused(vm, capsys, not_zip, "not a zip file")
    claims = vm["folder"] / "claims.zip"  # an end record claiming 65535 members
    claims.write_bytes(b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 0xFFFE, 0xFFFE, 0, 0, 0))
    refused(vm, capsys, claims, "members")


def test_overlapping_members_are_refused(vm, capsys):
    """Two directory entries pointing at the same bytes (the overlapping-file zip bomb)."""
    package = write_package(vm["folder"] / "p.zip", vm, [(raw(0), [0], [])])
    data = bytearray(package.read_bytes())
    # point the second central directory entry at the first local header
    first = data.find(b"PK\x01\x02")
    second = data.find(b"PK\x01\x02", first + 4)
    name_len = struct.unpack_from("<H", data, second + 28)[0]
    name = bytes(data[second + 46 : second + 46 + name_len])
    struct.pack_into("<L", data, second + 42, struct.unpack_from("<L", data, first + 42)[0])
    package.write_bytes(bytes(data))
    assert name  # the entry exists
    refused(vm, capsys, package, "")


def test_corrupt_lzma_and_crc_are_refused(vm, capsys):
    good = lzma.compress(raw(0))
    refused(
        vm,
        capsys,
        write_package(vm["folder"] / "a.zip", vm, [(b"", [0], [])], compress=lambda _: good[:-20]),
        "LZMA",
    )
    refused(
        vm,
        capsys,
        write_package(vm["folder"] / "b.zip", vm, [(b"", [0], [])], compress=lambda _: good + b"junk"),
        "after the end of its LZMA stream",
    )
    package = write_package(vm["folder"] / "c.zip", vm, [(raw(0), [0], [])])
    with zipfile.ZipFile(package) as z:
        info = z.getinfo("overlay-blob_1")
    data = bytearray(package.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 40] ^= 0xFF  # inside the blob
    package.write_bytes(bytes(data))
    refused(vm, capsys, package, "overlay-blob_1")


def test_another_base_vm_is_refused(vm, capsys):
    package = write_package(vm["folder"] / "p.zip", vm, [(raw(0), [0], [])], sha="ab" * 32)
    refused(vm, capsys, package, "is not the base VM of this package", code_wanted=5)


# --------------------------------------------------------------------------------------------
# what export refuses
# --------------------------------------------------------------------------------------------


def export_refused(capsys, folder: Path, overlay: Path, base_disk: Path, phrase: str, *extra: object) -> None:
    out = folder / "never.zip"
    code, err = run(capsys, "export", overlay, "--elijah", out, "--base-disk", base_disk, *extra)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmdelta: error: ") and phrase in lines[0], err
    assert not out.exists()


def test_export_refuses_what_the_package_cannot_describe(tmp_path, capsys):
    memory = write_pair(tmp_path, "memory", *sample_pair(seed=1, units=24))
    disk = write_pair(tmp_path, "disk", *sample_pair(seed=2, units=24))
    disk2 = write_pair(tmp_path, "disk2", *sample_pair(seed=3, units=24))
    two = make_overlay(tmp_path / "two", [("memory", *memory), ("disk", *disk), ("disk", *disk2)])
    export_refused(capsys, tmp_path, two, disk[0], "holds one disk; this overlay has 2")
    no_memory = make_overlay(tmp_path / "nomem", [("disk", *disk)])
    export_refused(capsys, tmp_path, no_memory, disk[0], "has no memory")
    small_units = make_overlay(tmp_path / "units", [("memory", *memory), ("disk", *disk)], unit_size=512)
    export_refused(capsys, tmp_path, small_units, disk[0], "512-byte units")
    good = make_overlay(tmp_path / "good", [("memory", *memory), ("disk", *disk)])
    export_refused(capsys, tmp_path, good, disk2[0], "is not the base of disk0")
    export_refused(capsys, tmp_path, good, disk[0], "xz presets", "--level", 12)


@pytest.fixture(autouse=True)
def _folders(tmp_path: Path) -> None:
    for name in ("two", "nomem", "units", "good"):
        (tmp_path / name).mkdir()


def test_a_codec_level_out_of_range_is_refused_before_the_package_is_read(vm, capsys):
    not_read = vm["folder"] / "missing.zip"  # the level is checked first: the package need not exist
    code, err = run(capsys, *import_args(vm, not_read, vm["folder"] / "o.vmdo"), "--codec", "lzma", "--level", 42)
    assert code == 2 and "takes levels 0 to 9" in err


def test_an_encoding_no_installed_encoder_decodes_is_refused_naming_it(vm, capsys, monkeypatch):
    monkeypatch.setenv("VMDELTA_DISABLE_PLUGINS", "bsdiff,disk,freepfn,qemu,trim,xdelta3,xor,xray,zstd")
    stream = item(0, CHUNK, XDELTA | MEMORY, u64(5) + b"VCD\x00\x00")
    refused(vm, capsys, write_package(vm["folder"] / "x.zip", vm, [(stream, [0], [])]), "XDELTA items", code_wanted=6)


# --------------------------------------------------------------------------------------------
# fuzzing (tox -e fuzz runs these with many more examples)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_vm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small VM and its exported package, made once for every fuzz example."""
    folder = tmp_path_factory.mktemp("elijah-fuzz")
    memory = write_pair(folder, "memory", *sample_pair(seed=21, units=32))
    disk = write_pair(folder, "disk", *sample_pair(seed=22, units=24, grow=1000))
    overlay = make_overlay(folder, [("memory", *memory), ("disk", *disk)])
    package = folder / "good.zip"
    assert main(["export", "-q", str(overlay), "--elijah", str(package), "--base-disk", str(disk[0])]) == 0
    return {"memory_base": memory[0], "memory": memory[1], "disk_base": disk[0], "disk": disk[1], "package": package}


def _import_fuzzed(vm: dict[str, Path], data: bytes, name: str) -> None:
    """Import ``data`` under the fuzz contract; an overlay it accepts must apply."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        package, output = folder / "fuzzed.zip", folder / "out.vmdo"
        package.write_bytes(data)
        result = check_untrusted(
            name,
            lambda: import_elijah(package, output, base_memory=vm["memory_base"], base_disk=vm["disk_base"], threads=1),
            memory=64 << 20,
        )
        if isinstance(result, VmdeltaError):
            assert "\n" not in str(result)
            assert not output.exists()
            return
        apply_overlay(
            ApplyConfig(
                overlay=output,
                images=[
                    ApplyImageSpec("memory", vm["memory_base"], folder / "m.out"),
                    ApplyImageSpec("disk", vm["disk_base"], folder / "d.out"),
                ],
            )
        )
        assert (folder / "m.out").stat().st_size == result.metadata.images[0].size


@fuzz_settings(40)
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_packages(fuzz_vm, flips):
    data = bytearray(fuzz_vm["package"].read_bytes())
    for at, mask in flips:
        data[at % len(data)] ^= mask
    _import_fuzzed(fuzz_vm, bytes(data), "elijah package")


@fuzz_settings(40)
@given(stream=st.binary(max_size=3 * CHUNK), chunks=st.lists(st.integers(0, 40), max_size=4))
def test_fuzz_item_streams(fuzz_vm, stream, chunks, tmp_path_factory):
    folder = tmp_path_factory.mktemp("items")
    vm = {**fuzz_vm, "folder": folder}
    package = write_package(folder / "p.zip", vm, [(stream, chunks, [])])
    _import_fuzzed(fuzz_vm, package.read_bytes(), "elijah item stream")


@fuzz_settings(40)
@given(meta=st.binary(max_size=512))
def test_fuzz_meta(fuzz_vm, meta, tmp_path_factory):
    folder = tmp_path_factory.mktemp("meta")
    package = write_package(folder / "p.zip", {**fuzz_vm, "folder": folder}, [], meta_bytes=meta)
    _import_fuzzed(fuzz_vm, package.read_bytes(), "elijah overlay-meta")
