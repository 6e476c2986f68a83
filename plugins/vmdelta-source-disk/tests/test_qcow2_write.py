"""Thin qcow2 synthesis and qcow2 rebuilds, checked with qemu-img check and compare."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from disk_helpers import UNIT, changed_units, qemu_raw
from vmdelta_source_disk import Qcow2Source, RawSource, write_qcow2
from vmdelta_source_disk.qcow2 import read_info

from vmdelta_core.plugin import ConfigError, RebuiltImage, SourceImage

pytestmark = pytest.mark.fixtures


def _rebuilt(
    tmp_path: Path,
    modified: Path,
    base: SourceImage,
    base_path: Path,
    changed: np.ndarray,
    layout: dict[str, object],
    **options: object,
) -> RebuiltImage:
    """A rebuilt image as the core hands it over: a private raw copy of the modified disk."""
    path = tmp_path / "rebuilt.raw"
    subprocess.run(["cp", "--sparse=always", str(modified), str(path)], check=True)
    os.chmod(path, 0o644)
    size = path.stat().st_size
    return RebuiltImage(
        path=path,
        size=size,
        unit_size=UNIT,
        envelope=b"",
        layout=layout,
        changed=changed,
        base=base,
        base_path=base_path,
        options=options,
    )


def _check(image: Path) -> None:
    result = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"leaks"' not in result.stdout and '"corruptions"' not in result.stdout, result.stdout


def _compare(qcow2: Path, raw: Path) -> None:
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", [3, 2])
def test_thin_output_from_the_raw_pair(tmp_path: Path, fixture_set: Path, need_qemu_img: None, version: int) -> None:
    base_path, modified = fixture_set / "base.img", fixture_set / "modified.img"
    raw = RawSource()
    with raw.open(base_path, kind="disk", options={}) as base, raw.open(modified, kind="disk", options={}) as mod:
        changed = changed_units(base.data, mod.data)
        rebuilt = _rebuilt(tmp_path, modified, base, base_path, changed, {"format": "raw"}, output_format="qcow2")
        out = tmp_path / "out.qcow2"
        if version == 2:
            from vmdelta_source_disk import write_thin_qcow2

            write_thin_qcow2(rebuilt, out, cluster_bits=16, version=2)
        else:
            raw.materialize(rebuilt, out)
    _check(out)
    _compare(out, modified)
    info = read_info(out, os.open(out, os.O_RDONLY))
    assert info.version == version and info.backing_file == str(base_path.resolve())
    assert info.backing_format == "raw"
    # only the clusters holding changes: 16 units per 64 KiB cluster at most
    assert out.stat().st_size <= (np.unique(changed // 16).size + 64) * 65536
    assert out.stat().st_size < modified.stat().st_size // 3


def test_thin_output_cluster_size_option(tmp_path: Path, fixture_set: Path, need_qemu_img: None) -> None:
    base_path, modified = fixture_set / "base.img", fixture_set / "modified.img"
    raw = RawSource()
    with raw.open(base_path, kind="disk", options={}) as base, raw.open(modified, kind="disk", options={}) as mod:
        changed = changed_units(base.data, mod.data)
        out = tmp_path / "out.qcow2"
        raw.materialize(
            _rebuilt(
                tmp_path,
                modified,
                base,
                base_path,
                changed,
                {"format": "raw"},
                output_format="qcow2",
                qcow2_cluster_size=4096,
            ),
            out,
        )
    _check(out)
    _compare(out, modified)
    # 4 KiB clusters: about one cluster per changed unit (all-zero units cost no cluster at all)
    assert out.stat().st_size <= (changed.size + 64) * 4096
    with pytest.raises(ConfigError, match="power of two"):
        raw.materialize(
            _rebuilt(
                tmp_path,
                modified,
                base,
                base_path,
                changed,
                {"format": "raw"},
                output_format="qcow2",
                qcow2_cluster_size=3000,
            ),
            tmp_path / "bad.qcow2",
        )


def test_grown_disk_thin_output(tmp_path: Path, fixture_set: Path, need_qemu_img: None) -> None:
    base_path = fixture_set / "base.img"
    grown = tmp_path / "grown.img"
    subprocess.run(["cp", "--sparse=always", str(base_path), str(grown)], check=True)
    os.chmod(grown, 0o644)
    with open(grown, "r+b") as f:
        f.truncate(192 << 20)
        f.seek(150 << 20)
        f.write(b"\x77" * 100_000)
    with RawSource().open(base_path, kind="disk", options={}) as base:
        # the core reports no changed unit past the base: the writer finds that data itself
        rebuilt = _rebuilt(
            tmp_path, grown, base, base_path, np.zeros(0, np.int64), {"format": "raw"}, output_format="qcow2"
        )
        out = tmp_path / "out.qcow2"
        RawSource().materialize(rebuilt, out)
    _check(out)
    _compare(out, grown)
    assert out.stat().st_size < 2 << 20


def test_qcow2_overlay_rebuilds_as_an_overlay_of_the_given_base(disks: Path, tmp_path: Path) -> None:
    """A modified disk that was an overlay of the base comes back as one, over the base given."""
    base_path = disks / "base.img"
    reference = qemu_raw(disks / "thin.qcow2", tmp_path / "ref.raw")
    with (
        RawSource().open(base_path, kind="disk", options={}) as base,
        Qcow2Source().open(disks / "thin.qcow2", kind="disk", options={}) as mod,
    ):
        changed = changed_units(base.data, mod.data)
        rebuilt = _rebuilt(tmp_path, tmp_path / "ref.raw", base, base_path, changed, dict(mod.layout))
        out = tmp_path / "out.qcow2"
        Qcow2Source().materialize(rebuilt, out)
    _check(out)
    _compare(out, tmp_path / "ref.raw")
    with Qcow2Source().open(out, kind="disk", options={}) as again:
        assert np.array_equal(again.data, reference)
        assert again.layout["backing_file"] == str(base_path.resolve())


def test_standalone_qcow2_rebuild_and_raw_output(disks: Path, tmp_path: Path) -> None:
    reference = qemu_raw(disks / "zstd.qcow2", tmp_path / "ref.raw")
    with Qcow2Source().open(disks / "zstd.qcow2", kind="disk", options={}) as mod:
        rebuilt = _rebuilt(
            tmp_path, tmp_path / "ref.raw", mod, disks / "zstd.qcow2", np.zeros(0, np.int64), dict(mod.layout)
        )
        out = tmp_path / "out.qcow2"
        Qcow2Source().materialize(rebuilt, out)
        _check(out)
        _compare(out, tmp_path / "ref.raw")
        assert read_info(out, os.open(out, os.O_RDONLY)).backing_file is None
        # --disk-format raw: the rebuilt file itself
        rebuilt = _rebuilt(
            tmp_path,
            tmp_path / "ref.raw",
            mod,
            disks / "zstd.qcow2",
            np.zeros(0, np.int64),
            dict(mod.layout),
            output_format="raw",
        )
        Qcow2Source().materialize(rebuilt, tmp_path / "out.raw")
        assert np.array_equal(np.fromfile(tmp_path / "out.raw", dtype=np.uint8), reference)


def test_writer_refuses_impossible_geometry(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(1000))
    with pytest.raises(ConfigError, match="512-byte sectors"):
        write_qcow2(tmp_path / "x.qcow2", src, np.arange(1), size=1000)
    with pytest.raises(ConfigError, match="cluster_bits"):
        write_qcow2(tmp_path / "x.qcow2", src, np.arange(1), size=1024, cluster_bits=8)


def test_writer_round_trips_through_the_reader(tmp_path: Path, need_qemu_img: None) -> None:
    """Small cluster sizes, a short last cluster and zero clusters, read back by QEMU and by us."""
    rng = np.random.default_rng(3)
    data = np.zeros(5 * 4096 + 1536, dtype=np.uint8)
    data[100:3000] = rng.integers(0, 256, 2900, dtype=np.uint8)
    data[-700:] = 9
    src = tmp_path / "src.raw"
    data.tofile(src)
    for bits in (9, 12, 16):
        out = tmp_path / f"w{bits}.qcow2"
        write_qcow2(out, src, np.arange(-(-data.size // (1 << bits))), size=data.size, cluster_bits=bits)
        _check(out)
        _compare(out, src)
        with Qcow2Source().open(out, kind="disk", options={}) as image:
            assert np.array_equal(image.data, data)
    assert shutil.which("qemu-img")
