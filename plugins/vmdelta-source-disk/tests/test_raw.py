"""The raw source on the real fixture disks: sparse in, sparse out, byte for byte."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from disk_helpers import UNIT
from vmdelta_source_disk import RawSource, sparsify

from vmdelta_core.plugin import ConfigError, RebuiltImage, data_extents, hole_extents
from vmdelta_core.testing import check_source


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.fixtures
@pytest.mark.parametrize("name", ["base.img", "modified.img", "variants/discard-ignore/modified.img"])
def test_check_source_on_real_disks(fixture_set: Path, name: str) -> None:
    image = check_source(RawSource(), fixture_set / name, "disk")
    assert image.exact_artifact and image.envelope == b"" and image.hints is None
    image.close()


@pytest.mark.fixtures
def test_holes_are_the_sparse_ranges_and_read_as_zero(fixture_set: Path) -> None:
    path = fixture_set / "modified.img"
    with RawSource().open(path, kind="disk", options={}) as image:
        assert np.array_equal(image.holes, hole_extents(path))
        assert image.holes.shape[0] > 10, "the fixture disk is trimmed: it has holes"
        hole_bytes = int(image.holes[:, 1].sum())
        assert hole_bytes + int(data_extents(path)[:, 1].sum()) == image.size
        for start, length in image.holes.tolist():
            assert not image.data[start : start + length].any()
        assert image.layout == {"format": "raw"}


@pytest.mark.fixtures
def test_materialize_writes_holes_not_zeros(fixture_set: Path, tmp_path: Path) -> None:
    """A rebuilt disk written densely comes out as sparse as the original, and identical."""
    original = fixture_set / "modified.img"
    dense = tmp_path / "rebuilt.raw"
    subprocess.run(["cp", "--sparse=never", str(original), str(dense)], check=True)
    os.chmod(dense, 0o644)
    size = dense.stat().st_size
    assert _allocated(dense) >= size
    with RawSource().open(fixture_set / "base.img", kind="disk", options={}) as base:
        rebuilt = RebuiltImage(
            path=dense,
            size=size,
            unit_size=UNIT,
            envelope=b"",
            layout={"format": "raw"},
            changed=np.arange(size // UNIT, dtype=np.int64),
            base=base,
            base_path=fixture_set / "base.img",
        )
        out = tmp_path / "out.img"
        RawSource().materialize(rebuilt, out)
    assert not dense.exists()
    assert out.read_bytes() == original.read_bytes()
    assert _allocated(out) <= _allocated(original) + (1 << 20)


def test_big_empty_disk_stays_small(tmp_path: Path) -> None:
    """A 64 GiB disk with a few writes: opening, finding holes and sparsifying touch only the data."""
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(64 << 30)
        for offset in (0, 5 << 30, (64 << 30) - UNIT):
            f.seek(offset)
            f.write(b"\xab" * UNIT)
        f.seek(7 << 30)
        f.write(bytes(4 * UNIT))  # written zeros: allocated until sparsified
    with RawSource().open(path, kind="disk", options={}) as image:
        assert image.size == 64 << 30
        assert int(image.holes[:, 1].sum()) >= (64 << 30) - 8 * UNIT
        assert image.data[5 << 30] == 0xAB
    before = _allocated(path)
    released = sparsify(path, np.array([(7 << 30) // UNIT + i for i in range(4)] + [0]), UNIT)
    assert released == 4 * UNIT
    assert _allocated(path) <= before - 4 * UNIT
    assert path.stat().st_size == 64 << 30


def test_bad_requests(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(8192))
    with pytest.raises(ConfigError, match="disks"):
        RawSource().open(path, kind="memory", options={})
    with pytest.raises(ConfigError, match="cannot open"):
        RawSource().open(tmp_path / "missing.img", kind="disk", options={})
    with RawSource().open(path, kind="disk", options={}) as base:
        rebuilt = RebuiltImage(
            path=path,
            size=8192,
            unit_size=UNIT,
            envelope=b"",
            layout={},
            changed=np.arange(2),
            base=base,
            base_path=path,
            options={"output_format": "vmdk"},
        )
        with pytest.raises(ConfigError, match="vmdk"):
            RawSource().materialize(rebuilt, tmp_path / "out")
