"""Real QEMU captures: the raw disk pairs of realistic-128 and its variants round-trip byte-exact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.fileio import data_extents
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry
from vmdelta_core.testing import files_identical

pytestmark = pytest.mark.fixtures
REGISTRY = Registry(new_plugin_manager(load_entry_points=False))
DISK_PAIRS = [
    "",
    "variants/discard-ignore",
    "variants/qemu-10.0-stream",
    "variants/qemu-10.0-mapped-ram",
    "variants/qemu-7.2-ignore-shared",
    "variants/qemu-10.0-ignore-shared",
]


@pytest.mark.parametrize("variant", DISK_PAIRS)
def test_raw_disk_pairs_round_trip(realistic: Path, variant: str, tmp_path: Path) -> None:
    folder = realistic / variant
    base, modified = folder / "base.img", folder / "modified.img"
    overlay, out = tmp_path / "disk.overlay", tmp_path / "rebuilt.img"
    report = create_overlay(
        CreateConfig(output=overlay, images=[ImageSpec("disk", base, modified)], cache_dir=tmp_path / "c"),
        registry=REGISTRY,
    )
    stats = report.images[0].statistics
    assert stats.changed > 1000
    assert report.size < 0.5 * stats.changed * 4096  # far below the changed bytes
    applied = apply_overlay(
        ApplyConfig(overlay=overlay, images=[ApplyImageSpec("disk", base, out)], cache_dir=tmp_path / "c"),
        registry=REGISTRY,
    )
    assert applied.images[0].artifact_identical
    assert files_identical(out, modified)
    # sparse: the rebuilt disk allocates no more than the modified one does (rounded to units)
    allocated = int(data_extents(out)[:, 1].sum())
    assert allocated <= int(data_extents(modified)[:, 1].sum()) + 64 * 4096
    assert os.stat(out).st_blocks * 512 < out.stat().st_size


def test_memory_raw_ram_and_disk_together(realistic: Path, tmp_path: Path) -> None:
    """Raw RAM images (x-ignore-shared backing files) with the disk: pages found on the base disk."""
    v = realistic / "variants/qemu-7.2-ignore-shared"
    overlay = tmp_path / "vm.overlay"
    images = [
        ImageSpec("memory", v / "base-ram.raw", v / "modified-ram.raw"),
        ImageSpec("disk", v / "base.img", v / "modified.img"),
    ]
    report = create_overlay(CreateConfig(output=overlay, images=images, cache_dir=tmp_path / "c"), registry=REGISTRY)
    memory = report.images[0].statistics
    assert memory.base_disk > 1000  # file pages read from the base disk since the base snapshot
    outs = [tmp_path / "ram.out", tmp_path / "disk.out"]
    apply_overlay(
        ApplyConfig(
            overlay=overlay,
            images=[ApplyImageSpec(s.kind, s.base, o) for s, o in zip(images, outs, strict=True)],
            cache_dir=tmp_path / "c",
        ),
        registry=REGISTRY,
    )
    assert files_identical(outs[0], images[0].modified) and files_identical(outs[1], images[1].modified)
