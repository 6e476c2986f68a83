"""Overlay container v1: golden files, and damage of every kind ends in a clean VmdeltaError."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import xxhash
from make_golden import golden_inputs, golden_overlay

from vmdelta_core.api import ApplyConfig, ApplyImageSpec, ImageSpec, apply_overlay, inspect_overlay
from vmdelta_core.errors import BaseMismatchError, FormatError, IntegrityError, VmdeltaError
from vmdelta_core.fuzzing import check_untrusted
from vmdelta_core.overlay.container import ENTRY_SIZE, TRAILER_SIZE, OverlayReader
from vmdelta_core.overlay.schema import FRAME_INDEX_ENTRY, TRAILER
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry

REGISTRY = Registry(new_plugin_manager(load_entry_points=False))


def _apply_golden(folder: Path, overlay: Path) -> list[bytes]:
    specs = [ImageSpec(kind, folder / f"{kind}.base", folder / f"{kind}.modified") for kind in ("memory", "disk")]
    if not specs[0].base.exists():
        specs = golden_inputs(folder)
    outputs = [folder / f"out-{spec.kind}" for spec in specs]
    apply_overlay(
        ApplyConfig(
            overlay=overlay,
            images=[ApplyImageSpec(s.kind, s.base, o) for s, o in zip(specs, outputs, strict=True)],
            threads=1,
            cache_dir=folder / "cache",
        ),
        registry=REGISTRY,
    )
    return [o.read_bytes() for o in outputs]


@pytest.mark.parametrize("name", ["none", "zstd", "zstd-whole-digest"])
def test_golden_overlays_still_apply(name: str, golden_dir: Path, tmp_path: Path) -> None:
    # zstd-whole-digest: written before digests were chunked; its XXH3-128 digests still verify
    rebuilt = _apply_golden(tmp_path, golden_dir / f"overlay-{name}.vmdo")
    assert rebuilt == [s.modified.read_bytes() for s in golden_inputs(tmp_path)]


def test_a_whole_digest_overlay_still_refuses_a_wrong_base(golden_dir: Path, tmp_path: Path) -> None:
    specs = golden_inputs(tmp_path)
    specs[1].base.write_bytes(specs[1].base.read_bytes()[::-1])
    with pytest.raises(BaseMismatchError, match="fingerprint differs"):
        _apply_golden(tmp_path, golden_dir / "overlay-zstd-whole-digest.vmdo")


def test_golden_overlay_is_reproduced_byte_for_byte(golden_dir: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.vmdo"
    golden_overlay(tmp_path, fresh, "none")
    old, new = (golden_dir / "overlay-none.vmdo").read_bytes(), fresh.read_bytes()
    with OverlayReader(golden_dir / "overlay-none.vmdo") as a, OverlayReader(fresh) as b:
        assert a.frames == b.frames  # same items, frames, offsets and checksums
        end = a.frames[-1].file_offset + a.frames[-1].stored_length
        assert old[:end] == new[:end]

        def without_versions(meta: dict) -> dict:
            meta = json.loads(json.dumps(meta))
            meta["creator"].pop("version")
            for c in meta["components"]:
                c.pop("version")
            return meta

        assert without_versions(a.metadata) == without_versions(b.metadata)


def test_inspect_describes_the_golden_overlay(golden_dir: Path) -> None:
    data = inspect_overlay(golden_dir / "overlay-zstd.vmdo")
    meta = data["metadata"]
    assert [i["name"] for i in meta["images"]] == ["memory", "disk0"]
    disk = meta["images"][1]
    assert disk["size"] == 24 * 4096 + 1000
    stats = disk["statistics"]
    assert stats["zero"] >= 1 and stats["self"] >= 1 and stats["base_disk"] >= 1
    assert {c["name"] for c in meta["components"]} >= {"zstd", "raw", "file"}


# ------------------------------------------------------------------------------------------------
# damage


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("small")
    overlay = folder / "small.vmdo"
    golden_overlay(folder, overlay, "zstd")
    _apply_golden(folder, overlay)  # warm the base index cache
    return folder, overlay.read_bytes()


def _try(folder: Path, data: bytes, name: str = "damaged.vmdo") -> list[bytes] | VmdeltaError:
    path = folder / name
    path.write_bytes(data)
    result = check_untrusted("apply of a damaged overlay", lambda: _apply_golden(folder, path))
    if isinstance(result, VmdeltaError):
        assert "\n" not in str(result)
    return result


def test_every_truncation_is_refused(small: tuple[Path, bytes]) -> None:
    folder, data = small
    for cut in range(len(data)):
        result = _try(folder, data[:cut])
        assert isinstance(result, (FormatError, IntegrityError)), f"cut at {cut} gave {result!r}"
    assert not any(p.name.startswith("out-") for p in folder.iterdir() if p.name.endswith(".rebuilt"))


def test_random_bit_flips_are_caught_by_checksums(small: tuple[Path, bytes]) -> None:
    folder, data = small
    rng = random.Random(1)
    for _ in range(2000):
        damaged = bytearray(data)
        bit = rng.randrange(len(data) * 8)
        damaged[bit // 8] ^= 1 << (bit % 8)
        assert isinstance(_try(folder, bytes(damaged)), VmdeltaError)


def reseal(data: bytearray) -> bytes:
    """Recompute every checksum, so damage reaches the parsers and the digest checks."""
    trailer = TRAILER.parse(bytes(data[-TRAILER_SIZE:]))
    index_start = trailer.index_offset
    entries = []
    for k in range(trailer.index_count):
        raw = data[index_start + k * ENTRY_SIZE : index_start + (k + 1) * ENTRY_SIZE]
        try:
            entry = FRAME_INDEX_ENTRY.parse(bytes(raw))
        except Exception:
            return bytes(data)
        stored = data[entry.file_offset : entry.file_offset + entry.stored_length]
        entry.checksum = xxhash.xxh3_64_intdigest(bytes(stored))
        entries.append(FRAME_INDEX_ENTRY.build(entry))
    index = b"".join(entries)
    data[index_start : index_start + len(index)] = index
    meta = bytes(data[trailer.metadata_offset : trailer.metadata_offset + trailer.metadata_length])
    body = struct.pack(
        ">QQQQQQ",
        trailer.metadata_offset,
        trailer.metadata_length,
        xxhash.xxh3_64_intdigest(meta),
        trailer.index_offset,
        trailer.index_count,
        xxhash.xxh3_64_intdigest(index),
    )
    data[-TRAILER_SIZE : -TRAILER_SIZE + 48] = body
    data[-16:-8] = xxhash.xxh3_64_intdigest(bytes(data[:-16])).to_bytes(8, "big")
    return bytes(data)


def test_resealed_bit_flips_never_give_a_wrong_output(small: tuple[Path, bytes], tmp_path: Path) -> None:
    folder, data = small
    expected = [s.modified.read_bytes() for s in golden_inputs(tmp_path)]
    trailer = TRAILER.parse(data[-TRAILER_SIZE:])
    rng = random.Random(2)
    outcomes = {"refused": 0, "harmless": 0}
    for _ in range(1500):
        damaged = bytearray(data)
        # aim at the parts a checksum no longer protects once resealed: frames, metadata, index
        bit = rng.randrange(16 * 8, (trailer.index_offset + trailer.index_count * ENTRY_SIZE) * 8)
        damaged[bit // 8] ^= 1 << (bit % 8)
        result = _try(folder, reseal(damaged))
        if isinstance(result, VmdeltaError):
            outcomes["refused"] += 1
        else:
            assert result == expected, f"bit {bit} produced a wrong output"
            outcomes["harmless"] += 1
    assert outcomes["refused"] > 1000


def test_not_an_overlay(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdo"
    path.write_bytes(b"hello world" * 100)
    with pytest.raises(FormatError, match="not a vmdelta overlay"):
        OverlayReader(path)
