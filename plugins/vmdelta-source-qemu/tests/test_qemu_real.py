"""Every real QEMU capture: read, rebuilt byte for byte, image and layout as QEMU saved them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zstandard
from qemu_helpers import rebuild
from vmdelta_source_qemu import QemuRamSource, QemuSource

from vmdelta_core.plugin import FormatError
from vmdelta_core.testing import check_source

pytestmark = pytest.mark.fixtures

STREAMS = ["", "variants/qemu-10.0-stream", "variants/qemu-10.0-mapped-ram"]
SHARED = ["variants/qemu-7.2-ignore-shared", "variants/qemu-10.0-ignore-shared"]


@pytest.mark.parametrize("variant", STREAMS)
@pytest.mark.parametrize("tag", ["base", "modified"])
def test_capture_rebuilds_byte_for_byte(fixture_set: Path, variant: str, tag: str) -> None:
    path = fixture_set / variant / f"{tag}.mem"
    image = check_source(QemuSource(), path, "memory")
    try:
        assert image.exact_artifact
        assert image.layout["format"] == ("mapped-ram" if "mapped" in variant else "stream")
        blocks = image.layout["blocks"]
        assert blocks[0]["name"] == "pc.ram" and blocks[0]["length"] == 128 << 20
        assert blocks[0]["offset"] == 0 and blocks[0]["guest_address"] == 0
        assert all(b["offset"] % 4096 == 0 for b in blocks)
        assert image.size == sum(b["length"] for b in blocks)
    finally:
        image.close()


def test_zero_pages_are_holes(fixture_set: Path) -> None:
    """SUMMARY.txt: base 21783 full pages + 15227 zero pages; modified 26674 + 10336."""
    for tag, zero in (("base", 15227), ("modified", 10336)):
        with QemuSource().open(fixture_set / f"{tag}.mem", kind="memory", options={}) as image:
            assert int(image.holes[:, 1].sum()) == zero * 4096
            starts, lengths = image.holes[:, 0], image.holes[:, 1]
            assert not any(image.data[s : s + n].any() for s, n in zip(starts[:50], lengths[:50], strict=True))


@pytest.mark.parametrize("variant", SHARED)
def test_ignore_shared_round_trip(fixture_set: Path, tmp_path: Path, variant: str) -> None:
    folder = fixture_set / variant
    ram = folder / "modified-ram.raw"
    with QemuSource().open(folder / "modified.mem", kind="memory", options={"ram": str(ram)}) as image:
        assert image.layout["ram_file_blocks"] == ["pc.ram"]
        blocks = {b["name"]: b for b in image.layout["blocks"]}
        assert blocks["pc.ram"]["guest_address"] == 0
        assert blocks["pc.bios"]["guest_address"] is None
        assert blocks["pc.bios"]["region_address"] == 0xFFFC0000
        raw = np.fromfile(ram, np.uint8)
        assert np.array_equal(image.data[: raw.shape[0]], raw)
        # the RAM file is only named, never part of the envelope
        assert len(image.envelope) < 300_000
        out_ram = tmp_path / "rebuilt-ram.raw"
        out = rebuild(image, tmp_path, {"ram": out_ram})
        assert out.read_bytes() == (folder / "modified.mem").read_bytes()
        assert out_ram.read_bytes() == ram.read_bytes()
        # rebuilt RAM files are sparse where the guest RAM is zero
        assert out_ram.stat().st_blocks * 512 < ram.stat().st_size


def test_rebuild_from_a_changed_image(fixture_set: Path, tmp_path: Path) -> None:
    """Pages that differ from the capture (dropped by a filter, say) load as the image says."""
    with QemuSource().open(fixture_set / "modified.mem", kind="memory", options={}) as image:
        data = image.data.copy()
        hole = int(image.holes[3, 0])
        data[hole : hole + 4096] = 0xA5
        data[8 << 20 : (8 << 20) + 3 * 4096] = 0
        out = rebuild(image, tmp_path, data=data)
        with QemuSource().open(out, kind="memory", options={}) as again:
            assert np.array_equal(again.data, data)
            assert again.envelope == image.envelope


def test_envelopes_of_two_snapshots_differ_little(fixture_set: Path) -> None:
    for variant in STREAMS:
        with (
            QemuSource().open(fixture_set / variant / "base.mem", kind="memory", options={}) as base,
            QemuSource().open(fixture_set / variant / "modified.mem", kind="memory", options={}) as mod,
        ):
            dictionary = zstandard.ZstdCompressionDict(base.envelope, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            stored = zstandard.ZstdCompressor(level=19, dict_data=dictionary).compress(mod.envelope)
            alone = zstandard.ZstdCompressor(level=19).compress(mod.envelope)
            assert len(stored) * 10 < len(alone), (variant, len(stored), len(alone))


def test_raw_ram_source(fixture_set: Path) -> None:
    ram = fixture_set / "variants/qemu-7.2-ignore-shared/base-ram.raw"
    image = check_source(QemuRamSource(), ram, "memory")
    try:
        assert image.layout["format"] == "raw"
        assert image.layout["blocks"] == [{"name": "pc.ram", "offset": 0, "length": 128 << 20, "guest_address": 0}]
        assert image.holes.shape[0] > 0
    finally:
        image.close()


def _sparse_copy(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    dest.chmod(0o644)
    return dest


def test_truncated_mapped_ram_file(fixture_set: Path, tmp_path: Path) -> None:
    path = _sparse_copy(fixture_set / "variants/qemu-10.0-mapped-ram/base.mem", tmp_path / "cut.mem")
    os.truncate(path, 0x100000 + (64 << 20))  # inside pc.ram's page area
    with pytest.raises(FormatError, match=r"stream truncated at offset 68157440: no VM description"):
        QemuSource().open(path, kind="memory", options={})


def test_mapped_ram_with_stale_data_is_not_exact(fixture_set: Path, tmp_path: Path) -> None:
    """Data in a page the bitmap does not mark is not RAM: QEMU ignores it, and so does the image."""
    original = fixture_set / "variants/qemu-10.0-mapped-ram/modified.mem"
    path = _sparse_copy(original, tmp_path / "stale.mem")
    with QemuSource().open(original, kind="memory", options={}) as clean:
        hole = int(clean.holes[5, 0])
        assert hole < 128 << 20  # a page of pc.ram, whose pages start at 1 MiB in the file
        with open(path, "r+b") as f:
            f.seek(0x100000 + hole)
            f.write(b"stale")
        with QemuSource().open(path, kind="memory", options={}) as stale:
            assert not stale.exact_artifact
            assert np.array_equal(stale.data, clean.data)
            assert stale.envelope == clean.envelope
            out = rebuild(stale, tmp_path)
            assert out.read_bytes() == original.read_bytes()
