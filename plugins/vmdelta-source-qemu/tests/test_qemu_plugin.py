"""The distribution as the core sees it: entry point, registered sources, format detection."""

from __future__ import annotations

from pathlib import Path

import vmdelta_source_qemu
from qemu_stream_builder import simple_stream

from vmdelta_core.registry import default_registry


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
