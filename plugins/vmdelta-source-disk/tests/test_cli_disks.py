"""End to end through ``vmdelta create`` / ``vmdelta apply`` with the disk sources installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from disk_helpers import changed_units
from vmdelta_source_disk.sources import Qcow2Source

from vmdelta_core import inspect_overlay
from vmdelta_core.testing import main

pytestmark = pytest.mark.fixtures


def vmdelta(*args: str | Path) -> int:
    return main([str(a) for a in args])


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _changed_in(overlay: Path) -> list[int]:
    meta = inspect_overlay(overlay)["metadata"]
    return [int(image["statistics"]["changed"]) for image in meta["images"]]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("pair", [".", "variants/discard-ignore", "variants/qemu-10.0-stream"])
def test_raw_pairs_round_trip_sparse(fixture_set: Path, tmp_path: Path, pair: str) -> None:
    base, modified = fixture_set / pair / "base.img", fixture_set / pair / "modified.img"
    overlay, out = tmp_path / "vm.overlay", tmp_path / "out.img"
    assert vmdelta("create", "-q", "-o", overlay, "--disk", base, modified) == 0
    assert vmdelta("apply", "-q", overlay, "--disk", base, out) == 0
    assert out.read_bytes() == modified.read_bytes()
    assert _allocated(out) <= _allocated(modified) + (1 << 20), "the rebuilt disk lost its holes"
    assert overlay.stat().st_size < modified.stat().st_size // 10


def test_thin_qcow2_output(fixture_set: Path, tmp_path: Path, need_qemu_img: None) -> None:
    base, modified = fixture_set / "base.img", fixture_set / "modified.img"
    overlay, out = tmp_path / "vm.overlay", tmp_path / "out.qcow2"
    assert vmdelta("create", "-q", "-o", overlay, "--disk", base, modified) == 0
    assert vmdelta("apply", "-q", overlay, "--disk", base, out, "--disk-format", "qcow2") == 0
    assert subprocess.run(["qemu-img", "check", str(out)], capture_output=True).returncode == 0
    compare = subprocess.run(["qemu-img", "compare", "-F", "raw", str(out), str(modified)], capture_output=True)
    assert compare.returncode == 0, compare.stdout
    assert out.stat().st_size < modified.stat().st_size // 3


def test_qcow2_input_is_compared_only_where_allocated(
    disks: Path, fixture_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, thin = disks / "base.img", disks / "thin.qcow2"
    truth = changed_units(
        np.fromfile(fixture_set / "base.img", np.uint8), np.fromfile(fixture_set / "modified.img", np.uint8)
    )
    overlay, out = tmp_path / "vm.overlay", tmp_path / "out.qcow2"
    assert vmdelta("create", "-q", "-o", overlay, "--disk", base, thin) == 0
    assert _changed_in(overlay) == [truth.size]
    assert vmdelta("apply", "-q", overlay, "--disk", base, out) == 0
    compare = subprocess.run(["qemu-img", "compare", str(out), str(thin)], capture_output=True)
    assert compare.returncode == 0, compare.stdout

    # hints that leave out a changed unit: the core believes them instead of comparing the disks
    real_open = Qcow2Source.open

    def lying_open(self, path, **kwargs):  # type: ignore[no-untyped-def]
        image = real_open(self, path, **kwargs)
        image.hints = image.hints[image.hints != truth[0]]
        return image

    monkeypatch.setattr(Qcow2Source, "open", lying_open)
    assert vmdelta("create", "-q", "-o", tmp_path / "lied.overlay", "--disk", base, thin) == 0
    assert _changed_in(tmp_path / "lied.overlay") == [truth.size - 1]


def test_several_disks_in_one_overlay(disks: Path, fixture_set: Path, tmp_path: Path) -> None:
    base = disks / "base.img"
    other_base = fixture_set / "variants/discard-ignore/base.img"
    other_modified = fixture_set / "variants/discard-ignore/modified.img"
    overlay = tmp_path / "vm.overlay"
    assert (
        vmdelta(
            "create", "-q", "-o", overlay, "--disk", base, disks / "thin.qcow2", "--disk", other_base, other_modified
        )
        == 0
    )
    assert len(_changed_in(overlay)) == 2
    out0, out1 = tmp_path / "disk0.img", tmp_path / "disk1.img"
    assert (
        vmdelta("apply", "-q", overlay, "--disk", base, out0, "--disk-format", "raw", "--disk", other_base, out1) == 0
    )
    assert out0.read_bytes() == (fixture_set / "modified.img").read_bytes()
    assert out1.read_bytes() == other_modified.read_bytes()


def test_damaged_qcow2_is_one_line(disks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes((disks / "thin.qcow2").read_bytes()[:100])
    code = vmdelta("create", "-q", "-o", tmp_path / "x.overlay", "--disk", disks / "base.img", broken)
    err = capsys.readouterr().err
    assert code == 3
    assert err.count("\n") == 1 and "not a usable qcow2 image" in err and "Traceback" not in err
    assert not (tmp_path / "x.overlay").exists()


def test_grown_disk(disks: Path, tmp_path: Path, need_qemu_img: None) -> None:
    """A modified disk larger than its base: the overlay records the new size, apply rebuilds it."""
    base = disks / "base.img"
    grown_raw = tmp_path / "grown.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disks / "grown.qcow2"), str(grown_raw)], check=True)
    for modified in (grown_raw, disks / "grown.qcow2"):
        overlay = tmp_path / f"{modified.name}.overlay"
        assert vmdelta("create", "-q", "-o", overlay, "--disk", base, modified) == 0
        assert inspect_overlay(overlay)["metadata"]["images"][0]["size"] == 192 << 20
        for fmt in ("raw", "qcow2"):
            out = tmp_path / f"out-{modified.name}.{fmt}"
            assert vmdelta("apply", "-q", overlay, "--disk", base, out, "--disk-format", fmt) == 0
            compare = subprocess.run(
                ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(out), str(grown_raw)], capture_output=True
            )
            assert compare.returncode == 0, compare.stdout
            if fmt == "qcow2":
                assert out.stat().st_size < 2 << 20  # the 108 KiB written, not the 64 MiB of growth
