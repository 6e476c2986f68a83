"""create + apply rebuild every image byte for byte, whatever the pair looks like."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdelta_core import Encoder, hookimpl
from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry


class Reverse(Encoder):
    """An encoder with a ref id above the self ref's, so apply must order its work right."""

    name = "reverse"

    def encode(self, bases, targets):
        return [bytes(t)[::-1] for t in targets]

    def decode(self, bases, payloads, lengths):
        return [bytes(p)[::-1] for p in payloads]


class ReversePlugin:
    @hookimpl
    def vmdelta_register_encoders(self, register) -> None:
        register(Reverse())


_pm = new_plugin_manager(load_entry_points=False)
_pm.register(ReversePlugin(), name="reverse")
REGISTRY = Registry(_pm)
UNIT = 4096


@st.composite
def image_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """A base of random/zero/text units, and a modified copy with zeroed, duplicated, moved,
    edited and new units, possibly grown or shrunk by a size that is not a multiple of the unit."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    units = draw(st.integers(1, 24))
    base_size = units * UNIT - draw(st.sampled_from([0, 0, 1, 777, UNIT - 1]))
    base = np.zeros(base_size, dtype=np.uint8)
    for u in range(units):
        pick = rng.integers(0, 3)
        lo, hi = u * UNIT, min((u + 1) * UNIT, base_size)
        if pick == 1:
            base[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8)
        elif pick == 2:
            base[lo:hi] = (np.arange(hi - lo) * (u + 1)) % 251
    delta = draw(st.sampled_from([0, 0, 0, 5000, -3000, 2 * UNIT]))
    size = max(1, base_size + delta)
    modified = np.zeros(size, dtype=np.uint8)
    modified[: min(size, base_size)] = base[: min(size, base_size)]
    full = size // UNIT
    for _ in range(draw(st.integers(0, 12))):
        if full == 0:
            break
        op = draw(st.sampled_from(["zero", "dup", "move", "edit", "new"]))
        a, b = rng.integers(0, full, 2)
        ua, ub = modified[a * UNIT : (a + 1) * UNIT], modified[b * UNIT : (b + 1) * UNIT]
        if op == "zero":
            ua[:] = 0
        elif op == "dup":
            ua[:] = ub
        elif op == "move" and b < base_size // UNIT:
            ua[:] = base[b * UNIT : (b + 1) * UNIT]
        elif op == "edit":
            ua[rng.integers(0, UNIT, 5)] ^= 0x55
        else:
            ua[:] = rng.integers(0, 256, UNIT, dtype=np.uint8)
    if size > base_size:
        modified[base_size:] = rng.integers(0, 256, size - base_size, dtype=np.uint8) * rng.integers(0, 2)
    if size % UNIT:
        modified[-1] ^= draw(st.sampled_from([0, 1]))
    return base, modified


def round_trip(
    tmp: Path, pairs: list[tuple[str, np.ndarray, np.ndarray]], encoders: tuple[str, ...] = (), **create: object
) -> list[Path]:
    specs, outputs = [], []
    for n, (kind, base, modified) in enumerate(pairs):
        b, m = tmp / f"{n}.base", tmp / f"{n}.modified"
        b.write_bytes(base.tobytes())
        m.write_bytes(modified.tobytes())
        specs.append(ImageSpec(kind, b, m, **({"encoders": encoders, "policy": "fixed"} if encoders else {})))
        outputs.append(tmp / f"{n}.out")
    overlay = tmp / "o.vmdo"
    create_overlay(
        CreateConfig(output=overlay, images=specs, cache_dir=tmp / "cache", threads=2, **create), registry=REGISTRY
    )
    apply_overlay(
        ApplyConfig(
            overlay=overlay,
            images=[ApplyImageSpec(s.kind, s.base, o) for s, o in zip(specs, outputs, strict=True)],
            cache_dir=tmp / "cache",
        ),
        registry=REGISTRY,
    )
    for (_, _, modified), out in zip(pairs, outputs, strict=True):
        assert out.read_bytes() == modified.tobytes()
    return outputs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=image_pairs())
def test_one_disk_round_trips(pair: tuple[np.ndarray, np.ndarray], tmp_path_factory) -> None:
    round_trip(tmp_path_factory.mktemp("rt"), [("disk", *pair)])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(memory=image_pairs(), disks=st.lists(image_pairs(), min_size=1, max_size=3))
def test_memory_and_several_disks_round_trip(memory, disks, tmp_path_factory) -> None:
    round_trip(tmp_path_factory.mktemp("rt"), [("memory", *memory)] + [("disk", *d) for d in disks])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(memory=image_pairs(), disk=image_pairs())
def test_self_references_to_units_of_any_encoder(memory, disk, tmp_path_factory) -> None:
    round_trip(tmp_path_factory.mktemp("rt"), [("memory", *memory), ("disk", *disk)], encoders=("reverse",))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=image_pairs(), codec=st.sampled_from(["zstd", "lzma", "none"]), frame=st.sampled_from([65536, 1 << 20]))
def test_codecs_and_frame_sizes(pair, codec: str, frame: int, tmp_path_factory) -> None:
    round_trip(tmp_path_factory.mktemp("rt"), [("disk", *pair)], codec=codec, frame_size=frame)


def test_dedup_across_images_and_within(tmp_path: Path) -> None:
    """A memory page equal to a base disk block, a disk block equal to a new memory page."""
    rng = np.random.default_rng(5)
    disk_base = rng.integers(0, 256, 8 * UNIT, dtype=np.uint8)
    mem_base = rng.integers(0, 256, 8 * UNIT, dtype=np.uint8)
    mem_mod = mem_base.copy()
    mem_mod[0:UNIT] = disk_base[3 * UNIT : 4 * UNIT]  # read a file into the page cache
    fresh = rng.integers(0, 256, UNIT, dtype=np.uint8)
    mem_mod[UNIT : 2 * UNIT] = fresh
    mem_mod[2 * UNIT : 3 * UNIT] = mem_base[5 * UNIT : 6 * UNIT]
    disk_mod = disk_base.copy()
    disk_mod[7 * UNIT :] = fresh  # written back to disk
    disk_mod[6 * UNIT : 7 * UNIT] = 0
    overlay = tmp_path / "o.vmdo"
    report = create_overlay(
        CreateConfig(
            output=overlay,
            images=[
                ImageSpec("memory", _w(tmp_path / "mb", mem_base), _w(tmp_path / "mm", mem_mod)),
                ImageSpec("disk", _w(tmp_path / "db", disk_base), _w(tmp_path / "dm", disk_mod)),
            ],
            cache_dir=tmp_path / "cache",
        ),
        registry=REGISTRY,
    )
    mem, disk = (i.statistics for i in report.images)
    assert (mem.changed, mem.base_disk, mem.base_memory, mem.encoders["raw"].units) == (3, 1, 1, 1)
    assert (disk.changed, disk.earlier, disk.zero) == (2, 1, 1)
    assert "raw" not in disk.encoders


def _w(path: Path, data: np.ndarray) -> Path:
    path.write_bytes(data.tobytes())
    return path
