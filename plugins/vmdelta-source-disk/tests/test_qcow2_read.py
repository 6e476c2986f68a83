"""Reading qcow2 images made by QEMU from the real fixture disks, checked against qemu-img."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from disk_helpers import UNIT, changed_units, qemu_raw
from vmdelta_source_disk import Qcow2Source, RawSource
from vmdelta_source_disk import chain as chain_module

from vmdelta_core.testing import check_source

pytestmark = pytest.mark.fixtures

ALL = ["v3", "v2", "zlib", "zstd", "small", "thin", "over", "top", "grown", "long", "short"]


def _holes_are_zero(image: object, reference: np.ndarray) -> None:
    for start, length in image.holes.tolist():  # type: ignore[attr-defined]
        assert not reference[start : start + length].any(), f"hole at {start}+{length} holds data"


@pytest.mark.parametrize("name", ALL)
def test_reads_what_qemu_reads(disks: Path, tmp_path: Path, name: str) -> None:
    reference = qemu_raw(disks / f"{name}.qcow2", tmp_path / "ref.raw")
    with Qcow2Source().open(disks / f"{name}.qcow2", kind="disk", options={"tmpdir": str(tmp_path)}) as image:
        assert image.size == reference.shape[0]
        assert not image.data.flags.writeable
        mismatch = np.flatnonzero(image.data != reference)
        assert mismatch.size == 0, f"{name}: first differing byte at {mismatch[:1]}"
        _holes_are_zero(image, reference)
        assert image.exact_artifact is False
        assert image.layout["format"] == "qcow2"


def test_versions_and_compression_are_reported(disks: Path) -> None:
    expect = {"v2": (2, "zlib"), "v3": (3, "zlib"), "zstd": (3, "zstd"), "small": (3, "zlib")}
    for name, (version, compression) in expect.items():
        with Qcow2Source().open(disks / f"{name}.qcow2", kind="disk", options={}) as image:
            assert (image.layout["version"], image.layout["compression"]) == (version, compression)
            assert image.hints is None and image.layout["backing_file"] is None
    with Qcow2Source().open(disks / "small.qcow2", kind="disk", options={}) as image:
        assert image.layout["cluster_bits"] == 12


def test_overlay_hints_cover_every_change_and_only_allocated_clusters(disks: Path, fixture_set: Path) -> None:
    raw = RawSource()
    with (
        raw.open(fixture_set / "base.img", kind="disk", options={}) as base,
        raw.open(fixture_set / "modified.img", kind="disk", options={}) as modified,
        Qcow2Source().open(disks / "thin.qcow2", kind="disk", options={}) as thin,
    ):
        changed = changed_units(base.data, modified.data)
        assert changed.size > 1000
        hints = thin.hints
        assert hints is not None and hints.dtype == np.int64
        assert np.all(np.diff(hints) > 0), "hints must be sorted and unique"
        assert np.isin(changed, hints).all(), "a changed unit lies outside the hints"
        # 64 KiB clusters hold 16 units: the hints stay within the clusters that hold changes
        assert hints.size <= np.unique(changed // 16).size * 16
        assert hints.size < modified.size // UNIT // 2
        assert Path(thin.layout["hints_base"]) == (disks / "base.img").resolve()
    with Qcow2Source().open(disks / "thin.qcow2", kind="disk", options={"use_hints": False}) as thin:
        assert thin.hints is None


def test_chain_hints_are_the_top_layer_only(disks: Path) -> None:
    with Qcow2Source().open(disks / "top.qcow2", kind="disk", options={}) as top:
        # top.qcow2 (4 KiB clusters) wrote 12 KiB at 1 MiB, 64 KiB of zeros at 2 MiB, 512 bytes at 130560
        expected = np.concatenate([np.arange(256, 259), np.arange(512, 528), [31]])
        assert np.array_equal(top.hints, np.sort(expected))
        assert top.layout["chain_depth"] == 3
        assert Path(top.layout["hints_base"]).name == "mid.qcow2"


def test_layered_and_copied_compositions_agree(disks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the mapping limit the raw bottom is copied instead of mapped; the bytes must not change."""
    with Qcow2Source().open(disks / "thin.qcow2", kind="disk", options={}) as mapped:
        expected = mapped.data.copy()
        holes = mapped.holes.copy()
    monkeypatch.setattr(chain_module, "MAX_MAPPINGS", 1)
    with Qcow2Source().open(disks / "thin.qcow2", kind="disk", options={}) as copied:
        assert np.array_equal(copied.data, expected)
        assert np.array_equal(copied.holes, holes)


@pytest.mark.parametrize("name", ["v3", "zstd", "thin"])
def test_check_source(disks: Path, name: str) -> None:
    check_source(Qcow2Source(), disks / f"{name}.qcow2", "disk")


def test_refuses_memory_kind(disks: Path) -> None:
    from vmdelta_core.plugin import ConfigError

    with pytest.raises(ConfigError):
        Qcow2Source().open(disks / "v3.qcow2", kind="memory", options={})
