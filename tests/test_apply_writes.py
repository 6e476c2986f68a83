"""How apply writes a frame: runs of adjacent units in one system call, zero units as holes, and
the result the same, byte for byte, as applying the items one by one in the order the format
gives them (references to the base, to earlier units, repeated live units included)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from samples import sample_pair, write_pair

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.apply.bases import Decoders
from vmdelta_core.apply.rebuild import ImageRebuilder, copy_base
from vmdelta_core.fileio import data_extents, open_file_image
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.items import ItemColumns, join_addresses
from vmdelta_core.overlay.metadata import OverlayMetadata
from vmdelta_core.overlay.schema import ItemType, Ref
from vmdelta_core.testing import registry_with

UNIT = 4096
UNITS = 48
REGISTRY = registry_with()


@pytest.fixture
def rebuilder(tmp_path: Path):
    """An :class:`ImageRebuilder` of a one-disk overlay (raw encoder), its scratch file holding
    a copy of the base; yields the rebuilder and the scratch path."""
    base_path, modified = write_pair(tmp_path, "disk", *sample_pair(seed=3, units=UNITS))
    overlay = tmp_path / "o.vmdo"
    config = CreateConfig(overlay, [ImageSpec("disk", base_path, modified)], codec="none", cache_dir=tmp_path / "c")
    create_overlay(config, registry=REGISTRY)
    with OverlayReader(overlay) as reader:
        meta = OverlayMetadata.from_json(reader.metadata, reader.frames)
    scratch = tmp_path / "scratch"
    scratch.write_bytes(base_path.read_bytes())
    fd = os.open(scratch, os.O_RDWR)
    base = open_file_image(base_path, "disk")
    with ThreadPoolExecutor(2) as pool:
        yield ImageRebuilder(None, meta, Decoders.find(meta, REGISTRY), [base], [fd], pool), scratch  # type: ignore[arg-type]
    base.close()
    os.close(fd)


def random_items(seed: int, base_units: int) -> ItemColumns:
    """Items in address order over every unit of the image: runs of raw units, zeros, base and
    self references (some reading units this very frame rewrites), and repeated live units."""
    rng = np.random.default_rng(seed)
    units = np.sort(rng.choice(UNITS, size=UNITS * 3 // 4, replace=False))
    repeat = rng.random(units.size) < 0.15  # a live item repeating the unit before it
    units = np.sort(np.concatenate([units, units[repeat]]))
    n = units.size
    refs = rng.choice([int(Ref.RAW), int(Ref.ZEROS), int(Ref.BASE_DISK), int(Ref.SELF)], size=n, p=[0.4, 0.2, 0.2, 0.2])
    refs[0] = Ref.RAW  # nothing earlier to refer to
    values = np.zeros(n, dtype=np.uint64)
    payloads: list[bytes | None] = [None] * n
    for i in range(n):
        if refs[i] == Ref.RAW:
            payloads[i] = rng.integers(0, 256, UNIT, dtype=np.uint8).tobytes()
        elif refs[i] == Ref.BASE_DISK:
            values[i] = join_addresses(0, np.array([rng.integers(0, base_units) * UNIT]))[0]
        elif refs[i] == Ref.SELF:
            earlier = int(rng.integers(0, units[i])) if units[i] else 0
            if units[i] == 0:
                refs[i], payloads[i] = Ref.RAW, bytes(UNIT)
            else:
                values[i] = join_addresses(0, np.array([earlier * UNIT]))[0]
    live = np.zeros(n, dtype=bool)
    live[1:] = units[1:] == units[:-1]
    return ItemColumns(
        offsets=(units * UNIT).astype(np.uint64),
        lengths=np.full(n, UNIT, dtype=np.int64),
        refs=refs.astype(np.uint8),
        types=np.where(live, int(ItemType.DISK_LIVE), int(ItemType.DISK)).astype(np.uint8),
        values=values,
        payloads=payloads,
        live_seqs=np.where(live, 1, -1).astype(np.int32),
    )


def applied_one_by_one(image: bytearray, base: bytes, cols: ItemColumns) -> bytearray:
    """The format's meaning of a frame: refs in increasing order with self references last, each
    ref's items in order, every item read and written on its own."""
    refs = sorted(set(cols.refs.tolist()), key=lambda r: (r == Ref.SELF, r))
    for ref in refs:
        for i in np.flatnonzero(cols.refs == ref).tolist():
            at, n, value = int(cols.offsets[i]), int(cols.lengths[i]), int(cols.values[i])
            source = value & ((1 << 52) - 1)
            if ref == Ref.ZEROS:
                image[at : at + n] = bytes(n)
            elif ref == Ref.RAW:
                image[at : at + n] = cols.payloads[i]  # type: ignore[assignment]
            elif ref == Ref.BASE_DISK:
                image[at : at + n] = base[source : source + n]
            else:
                image[at : at + n] = bytes(image[source : source + n])
    return image


@pytest.mark.parametrize("seed", range(6))
def test_a_frame_written_in_runs_is_the_frame_applied_item_by_item(rebuilder, seed: int) -> None:
    rebuild, scratch = rebuilder
    before = scratch.read_bytes()
    cols = random_items(seed, UNITS)
    rebuild._write(0, cols, "frame")
    expected = applied_one_by_one(bytearray(before), before, cols)
    assert scratch.read_bytes() == bytes(expected)


def final_refs(cols: ItemColumns) -> dict[int, int]:
    """Unit offset -> the ref whose bytes the unit ends with (the format's order)."""
    final: dict[int, int] = {}
    for ref in sorted(set(cols.refs.tolist()), key=lambda r: (r == Ref.SELF, r)):
        for i in np.flatnonzero(cols.refs == ref).tolist():
            final[int(cols.offsets[i])] = ref
    return final


def test_zero_units_become_holes_and_each_run_is_one_write(rebuilder, monkeypatch) -> None:
    rebuild, scratch = rebuilder
    cols = random_items(11, UNITS)
    keep = cols.refs != Ref.SELF  # self references whose sources this frame rewrites go one by one
    cols = ItemColumns(
        offsets=cols.offsets[keep],
        lengths=cols.lengths[keep],
        refs=cols.refs[keep],
        types=cols.types[keep],
        values=cols.values[keep],
        payloads=[p for p, k in zip(cols.payloads, keep.tolist(), strict=True) if k],
        live_seqs=cols.live_seqs[keep],
    )
    calls = []
    for name in ("pwrite", "pwritev"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real: calls.append(a[1:]) or _real(*a))
    rebuild._write(0, cols, "frame")
    monkeypatch.undo()
    final = final_refs(cols)
    offsets = sorted(final)
    data_runs = sum(
        1
        for k, at in enumerate(offsets)
        if final[at] != Ref.ZEROS and not (k and offsets[k - 1] == at - UNIT and final[offsets[k - 1]] != Ref.ZEROS)
    )
    assert len(calls) == data_runs
    zeros = {at for at, ref in final.items() if ref == Ref.ZEROS}
    allocated = set()
    for start, length in data_extents(scratch).tolist():
        allocated.update(range(start - start % UNIT, start + length, UNIT))
    assert zeros and not zeros & allocated  # every zeroed unit is a hole, none is written


def sparse_base(path: Path) -> Path:
    """40 MiB with data in three places, one across a 16 MiB piece boundary, holes elsewhere."""
    rng = np.random.default_rng(9)
    with open(path, "wb") as f:
        f.truncate(40 << 20)
        for at, n in ((0, 3 * UNIT), ((16 << 20) - 2 * UNIT, 5 * UNIT), ((40 << 20) - UNIT, UNIT)):
            f.seek(at)
            f.write(rng.integers(1, 256, n, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("mapped", [False, True], ids=["file, copied by the kernel", "map, written"])
@pytest.mark.parametrize("parallel", [False, True], ids=["in order", "on a pool"])
def test_a_base_copied_in_pieces_is_the_base_with_its_holes(tmp_path: Path, mapped: bool, parallel: bool) -> None:
    path = sparse_base(tmp_path / "base")
    base = open_file_image(path, "disk")
    if mapped:  # a source whose image is not a file of its own (a QEMU stream's RAM)
        base.file = None
    out = tmp_path / "scratch"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    advanced = []
    try:
        with ThreadPoolExecutor(2) as pool:
            copy_base(base, fd, base.size, UNIT, advanced.append, pool=pool if parallel else None)
    finally:
        os.close(fd)
        base.close()
    assert out.read_bytes() == path.read_bytes() and sum(advanced) == path.stat().st_size
    written = sum(length for _, length in data_extents(out).tolist())
    assert written <= 8 * UNIT + (1 << 20)  # the holes stay holes (a file system may round up)


def test_a_stopped_base_copy_ends_between_pieces(tmp_path: Path) -> None:
    path = sparse_base(tmp_path / "base")
    base = open_file_image(path, "disk")
    stop = threading.Event()
    fd = os.open(tmp_path / "scratch", os.O_RDWR | os.O_CREAT)
    try:
        copy_base(base, fd, base.size, UNIT, lambda n: stop.set(), stop=stop)  # stopped once started
    finally:
        os.close(fd)
        base.close()
    assert not (tmp_path / "scratch").read_bytes().strip(b"\0")
