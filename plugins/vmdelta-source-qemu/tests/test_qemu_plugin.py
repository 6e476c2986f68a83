"""The distribution as the core sees it: entry point, registered sources, format detection."""

from __future__ import annotations

import os
from pathlib import Path

import vmdelta_source_qemu
from qemu_helpers import rebuilt_image
from qemu_stream_builder import ignore_shared_stream, simple_stream
from vmdelta_source_qemu import QemuRamSource, QemuSource

from vmdelta_core.testing import default_registry


def test_sources_registered_through_the_entry_point() -> None:
    registry = default_registry()
    assert registry.source("qemu").name == "qemu"
    assert registry.source("qemu-ram").name == "qemu-ram"
    assert registry.info("source", "qemu").distribution == "vmdelta-source-qemu"


def test_detection_by_magic(tmp_path: Path) -> None:
    stream = tmp_path / "s.mem"
    stream.write_bytes(simple_stream())
    other = tmp_path / "other.bin"
    other.write_bytes(b"\0" * 8192)
    head = stream.read_bytes()[:4096]
    assert vmdelta_source_qemu.vmdelta_detect_source(path=stream, head=head, kind="memory") == "qemu"
    assert vmdelta_source_qemu.vmdelta_detect_source(path=stream, head=head, kind="disk") is None
    registry = default_registry()
    assert registry.detect_source(stream, "memory") == "qemu"
    assert registry.detect_source(other, "memory") != "qemu"


def test_declared_option_names_and_side_files() -> None:
    assert QemuSource.option_names == {"tmpdir", "max_ram"}
    assert [side.name for side in QemuSource.side_files] == ["ram"]
    assert QemuRamSource.option_names == {"block", "guest_address"}
    assert QemuRamSource.side_files == ()


def _unnamed(folder: Path) -> tuple[int, Path]:
    fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    return fd, Path(f"/proc/self/fd/{fd}")


def test_outputs_may_be_unnamed_files(tmp_path: Path) -> None:
    """apply hands materialize unnamed files (O_TMPFILE through /proc/self/fd): the stream and the
    x-ignore-shared RAM file are written through those paths, and nothing appears beside them."""
    stream, ram = ignore_shared_stream()
    (tmp_path / "in").mkdir()
    (tmp_path / "in/s.mem").write_bytes(stream)
    (tmp_path / "in/ram.raw").write_bytes(ram)
    image = QemuSource().open(tmp_path / "in/s.mem", kind="memory", options={"ram": str(tmp_path / "in/ram.raw")})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    raw_fd, raw = _unnamed(out_dir)
    out_fd, out = _unnamed(out_dir)
    ram_fd, ram_out = _unnamed(out_dir)
    try:
        os.write(raw_fd, image.data.tobytes())
        QemuSource().materialize(rebuilt_image(image, raw, {"ram": ram_out}), out)
        assert list(out_dir.iterdir()) == []
        assert os.pread(out_fd, len(stream) + 1, 0) == stream
        assert os.pread(ram_fd, len(ram) + 1, 0) == ram
    finally:
        image.close()
        for fd in (raw_fd, out_fd, ram_fd):
            os.close(fd)
