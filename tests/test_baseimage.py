"""Kept base images (``vmdelta index --image``): a base opened from its kept image is the image
its source built, and a kept image is used only for the base as it was when kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.baseimage import keep_image, kept_image, open_base_image
from vmdelta_core.components import SourceImage
from vmdelta_core.fileio import open_file_image


def built_image(seed: int = 3) -> SourceImage:
    """An image as a source that lays it out itself returns it: no file behind it, an envelope,
    a layout, holes."""
    rng = np.random.default_rng(seed)
    data = np.zeros(5 << 20, dtype=np.uint8)  # zeros for whole MiBs: they stay holes
    data[: 1 << 20] = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    data[(3 << 20) + 17 : (3 << 20) + 4000] = 9
    return SourceImage(
        kind="memory",
        data=data,
        holes=np.array([[1 << 20, 2 << 20]], dtype=np.int64),
        envelope=b"device state \x00\x01" * 100,
        layout={"blocks": [{"name": "pc.ram", "size": 5 << 20}]},
        exact_artifact=False,
    )


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.mem"
    path.write_bytes(b"the artifact the image was built from")
    return path


def test_a_kept_image_reads_back_as_the_source_built_it(base: Path, tmp_path: Path) -> None:
    image = built_image()
    cache = tmp_path / "cache"
    kept_path = keep_image(base, image, source="qemu", options={}, cache_dir=cache)
    assert kept_path is not None and kept_path.stat().st_blocks * 512 < image.size  # zeros left as holes
    with kept_image(base, "qemu", kind="memory", options={}, cache_dir=cache) as kept:
        assert np.array_equal(kept.data, built_image().data)
        assert kept.envelope == image.envelope and kept.layout == image.layout
        assert np.array_equal(kept.holes, image.holes) and kept.exact_artifact is False
        assert kept.file is None  # still not the artifact: apply treats it as the source's own image


def test_a_kept_image_is_only_for_the_base_as_it_was(base: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keep_image(base, built_image(), source="qemu", options={}, cache_dir=cache)
    assert kept_image(base, "qemu", kind="disk", options={}, cache_dir=cache) is None  # another kind
    assert kept_image(base, "raw", kind="memory", options={}, cache_dir=cache) is None  # another source
    assert kept_image(base, "qemu", kind="memory", options={"max_ram": 1}, cache_dir=cache) is None
    stat = base.stat()
    os.utime(base, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the base changed
    assert kept_image(base, "qemu", kind="memory", options={}, cache_dir=cache) is None


@pytest.mark.parametrize("damage", ["description", "image"])
def test_a_damaged_kept_image_is_not_used(base: Path, tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    kept_path = keep_image(base, built_image(), source="qemu", options={}, cache_dir=cache)
    assert kept_path is not None
    if damage == "description":
        meta = Path(str(kept_path) + ".meta")
        meta.write_bytes(meta.read_bytes()[:40])  # cut inside its JSON
    else:
        kept_path.write_bytes(b"replaced")  # another file at its name
    assert kept_image(base, "qemu", kind="memory", options={}, cache_dir=cache) is None


def test_an_image_that_is_the_file_itself_has_nothing_to_keep(tmp_path: Path) -> None:
    disk = tmp_path / "base.img"
    disk.write_bytes(bytes(8192))
    with open_file_image(disk, "disk") as image:
        assert keep_image(disk, image, source="raw", options={}, cache_dir=tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()


def test_a_base_is_opened_by_its_source_when_nothing_was_kept(base: Path, tmp_path: Path) -> None:
    opened = []

    class Builder:
        def open(self, path, *, kind, options):  # type: ignore[no-untyped-def]
            opened.append(path)
            return built_image()

    cache = tmp_path / "cache"
    first = open_base_image(Builder(), "qemu", base, kind="memory", options={}, cache_dir=cache)  # type: ignore[arg-type]
    keep_image(base, first, source="qemu", options={}, cache_dir=cache)
    again = open_base_image(Builder(), "qemu", base, kind="memory", options={}, cache_dir=cache)  # type: ignore[arg-type]
    assert opened == [base] and np.array_equal(again.data, first.data)
