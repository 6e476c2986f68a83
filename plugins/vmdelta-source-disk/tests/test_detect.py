"""Format detection through the plugin manager, as the core asks it."""

from __future__ import annotations

from pathlib import Path

import pytest
from disk_helpers import qemu_img

from vmdelta_core.testing import default_registry


@pytest.fixture
def files(tmp_path: Path, need_qemu_img: None) -> dict[str, Path]:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\x00" * 4096)
    q = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", q, "1M")
    return {"raw": raw, "qcow2": q}


def test_registered_sources() -> None:
    registry = default_registry()
    assert {"raw", "qcow2"} <= set(registry.names("source"))
    assert registry.info("source", "raw").distribution == "vmdelta-source-disk"
    assert registry.source("raw").output_formats == ("qcow2",)


def test_detection(files: dict[str, Path]) -> None:
    registry = default_registry()
    assert registry.detect_source(files["qcow2"], "disk") == "qcow2"
    assert registry.detect_source(files["raw"], "disk") == "raw"
    # memory images are not ours: the core's generic file source keeps them
    assert registry.detect_source(files["raw"], "memory") == "file"


def test_detection_without_the_core_fallback(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDELTA_DISABLE_PLUGINS", "core-file")
    registry = default_registry()
    assert "file" not in registry.names("source")
    assert registry.detect_source(files["raw"], "disk") == "raw"
    assert registry.detect_source(files["qcow2"], "disk") == "qcow2"
