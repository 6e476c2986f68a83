"""Damaged, encrypted and unsupported qcow2 files: one clear error each, never a traceback."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from disk_helpers import qemu_img, qemu_io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmdelta_source_disk import Qcow2Source
from vmdelta_source_disk.qcow2 import ClusterMap, read_cluster_map, read_info

from vmdelta_core.plugin import ConfigError, FormatError, VmdeltaError


def _open(path: Path) -> None:
    Qcow2Source().open(path, kind="disk", options={}).close()


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def small(tmp_path: Path, need_qemu_img: None) -> Path:
    """A 4 MiB v3 image with a few data clusters."""
    path = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 0x41 0 128k", "write -P 0x42 3M 64k")
    return path


@pytest.fixture
def compressed(tmp_path: Path, need_qemu_img: None) -> Path:
    raw = tmp_path / "text.raw"
    raw.write_bytes((b"compressible text, line after line\n" * 40000)[: 1 << 20])
    path = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path)
    return path


def _first(path: Path, kind: int) -> tuple[int, int]:
    """(file offset of the L2 entry, host offset) of the first cluster of ``kind``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = read_info(path, fd)
        cm = read_cluster_map(info, fd)
        n = int(cm.select(kind)[0])
        l1 = struct.unpack(">Q", os.pread(fd, 8, info.l1_offset))[0]
        l2 = l1 & 0x00FFFFFFFFFFFE00
        return l2 + 8 * (int(cm.guest[n]) // info.cluster_size), int(cm.host[n])
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        (0, b"QFI\x00", "cannot parse the header"),
        (4, struct.pack(">I", 4), "version 4"),
        (20, struct.pack(">I", 30), "cluster_bits 30"),
        (72, struct.pack(">Q", 1 << 10), "bit 10 (unknown)"),
        (72, struct.pack(">Q", 1 << 1), "corrupt"),
        (72, struct.pack(">Q", 1 << 2), "external data file"),
        (36, struct.pack(">I", 0), "cannot map"),
        (40, struct.pack(">Q", 1 << 40), "L1 table offset"),
        (100, struct.pack(">I", 96), "header_length"),
        (112, struct.pack(">II", 0x6803F857, 0xFFFFFF), "header extensions"),
    ],
)
def test_damaged_header(small: Path, offset: int, data: bytes, message: str) -> None:
    _patch(small, offset, data)
    with pytest.raises(FormatError, match=re.escape(message)):
        _open(small)


def test_truncated_files(small: Path) -> None:
    whole = small.read_bytes()
    for cut in (0, 3, 50, 100, 70000, 200000):
        small.write_bytes(whole[:cut])
        with pytest.raises(FormatError):
            _open(small)


def test_l2_entry_past_end_of_file(small: Path) -> None:
    entry_at, _ = _first(small, ClusterMap.DATA)
    _patch(small, entry_at, struct.pack(">Q", (1 << 63) | (1 << 45)))
    with pytest.raises(FormatError, match=r"past the end of the file \(at byte offset 35184372088832\)"):
        _open(small)


def test_l2_entry_with_reserved_bits(small: Path) -> None:
    entry_at, host = _first(small, ClusterMap.DATA)
    _patch(small, entry_at, struct.pack(">Q", (1 << 63) | host | 0x10))
    with pytest.raises(FormatError, match=f"reserved bits set \\(at byte offset {entry_at}\\)"):
        _open(small)


def test_unaligned_data_cluster(small: Path) -> None:
    entry_at, host = _first(small, ClusterMap.DATA)
    _patch(small, entry_at, struct.pack(">Q", (1 << 63) | (host + 512)))
    with pytest.raises(FormatError, match="unaligned"):
        _open(small)


def test_garbled_compressed_cluster(compressed: Path) -> None:
    _, host = _first(compressed, ClusterMap.COMPRESSED)
    _patch(compressed, host, b"\xff" * 64)
    with pytest.raises(FormatError, match=f"does not decompress.*at byte offset {host}"):
        _open(compressed)


def test_encrypted_image_is_refused(tmp_path: Path, need_qemu_img: None) -> None:
    path = tmp_path / "secret.qcow2"
    qemu_img(
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=password",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        path,
        "1M",
    )
    with pytest.raises(FormatError, match="encrypted \\(LUKS\\)"):
        _open(path)


def test_extended_l2_is_refused(tmp_path: Path, need_qemu_img: None) -> None:
    path = tmp_path / "subclusters.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "1M")
    with pytest.raises(FormatError, match="extended L2"):
        _open(path)


def test_missing_and_looping_backing_files(tmp_path: Path, need_qemu_img: None) -> None:
    raw = tmp_path / "gone.img"
    raw.write_bytes(bytes(1 << 20))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.img", "-F", "raw", top)
    raw.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        _open(top)
    qemu_img("rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", top)
    with pytest.raises(FormatError, match="loops"):
        _open(top)


def test_not_a_local_backing_file(tmp_path: Path, need_qemu_img: None) -> None:
    top = tmp_path / "remote.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", top, "1M")
    qemu_img("rebase", "-u", "-b", "nbd://example.invalid/disk", "-F", "raw", top)
    with pytest.raises(ConfigError, match="not a local file"):
        _open(top)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 4 * 65536 - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_random_damage_never_escapes(small: Path, flips: list[tuple[int, int]]) -> None:
    """Any damage to the metadata clusters gives an image or a VmdeltaError, nothing else."""
    original = getattr(test_random_damage_never_escapes, "_original", None)
    if original is None or original[0] != small:
        original = (small, small.read_bytes())
        test_random_damage_never_escapes._original = original  # type: ignore[attr-defined]
    data = bytearray(original[1])
    for offset, value in flips:
        data[offset % len(data)] ^= value
    small.write_bytes(bytes(data))
    try:
        with Qcow2Source().open(small, kind="disk", options={}) as image:
            assert image.data.dtype == np.uint8
    except VmdeltaError:
        pass


def test_qemu_agrees_these_are_broken(small: Path) -> None:
    """The header damage above is real damage: QEMU refuses the same files."""
    _patch(small, 72, struct.pack(">Q", 1 << 10))
    result = subprocess.run(["qemu-img", "info", str(small)], capture_output=True, text=True)
    assert result.returncode != 0
