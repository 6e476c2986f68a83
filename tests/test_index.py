"""Base indexes are built once, reused, and rebuilt when the base changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xxhash

from vmdelta_core.builtin.file import FileSource
from vmdelta_core.index import BaseIndex, load_or_build_index, unit_hashes


def open_file(path: Path):
    return FileSource().open(path, kind="disk", options={})


def test_cached_then_rebuilt_when_the_base_changes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = tmp_path / "base.img"
    base.write_bytes(rng.integers(0, 256, 10 * 4096 + 5, dtype=np.uint8).tobytes())
    with open_file(base) as image:
        first, cached = load_or_build_index(base, image, source="file", unit=4096, options={}, cache_dir=tmp_path / "c")
    assert not cached and first.units.tolist() == list(range(10))  # the short last unit is not indexed
    with open_file(base) as image:
        again, cached = load_or_build_index(base, image, source="file", unit=4096, options={}, cache_dir=tmp_path / "c")
    assert cached and again.fingerprint == first.fingerprint and np.array_equal(again.hashes, first.hashes)
    assert np.array_equal(again.units, first.units)
    data = bytearray(base.read_bytes())
    data[5000] ^= 1
    base.write_bytes(bytes(data))
    os.utime(base, ns=(1, 1))
    with open_file(base) as image:
        fresh, cached = load_or_build_index(base, image, source="file", unit=4096, options={}, cache_dir=tmp_path / "c")
    assert not cached and fresh.fingerprint != first.fingerprint
    assert (fresh.hashes != first.hashes).sum() == 1


def test_a_damaged_cache_file_is_ignored(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(range(256)) * 64)
    with open_file(base) as image:
        index, _ = load_or_build_index(base, image, source="file", unit=4096, options={}, cache_dir=tmp_path / "c")
    for cached in (tmp_path / "c").iterdir():
        cached.write_bytes(cached.read_bytes()[:-3])
    with open_file(base) as image:
        again, cached = load_or_build_index(base, image, source="file", unit=4096, options={}, cache_dir=tmp_path / "c")
    assert not cached and again.fingerprint == index.fingerprint


def test_lookup_finds_units_by_hash() -> None:
    index = BaseIndex(
        size=9 * 4096,
        unit_size=4096,
        fingerprint="x",
        units=np.array([0, 2, 5, 8]),
        hashes=np.array([5, 3, 9, 3], dtype=np.uint64),
    )
    found = index.lookup(np.array([3, 9, 4, 10], dtype=np.uint64))
    assert found[1] == 5 and found[0] in (2, 8) and found[2] == -1 and found[3] == -1


def test_only_units_with_data_are_indexed(tmp_path: Path) -> None:
    data = np.zeros(64 * 4096, dtype=np.uint8)
    data[3 * 4096] = 1
    data[40 * 4096 : 41 * 4096] = 7
    base = tmp_path / "sparse.img"
    base.write_bytes(data.tobytes())
    with open_file(base) as image:
        index, _ = load_or_build_index(base, image, source="file", unit=4096, options={}, cache_dir=tmp_path / "c")
    assert index.units.tolist() == [3, 40]


def test_unit_hashes_of_chosen_rows_are_the_rows_own_hashes() -> None:
    rng = np.random.default_rng(5)
    units = rng.integers(0, 256, size=(9, 512), dtype=np.uint8)
    units[[2, 6]] = 0
    every = unit_hashes(units)
    assert every.tolist() == [xxhash.xxh3_64_intdigest(row.tobytes()) for row in units]
    rows = np.array([6, 0, 8, 2, 8])
    assert unit_hashes(units, rows).tolist() == every[rows].tolist()
    assert unit_hashes(units, np.zeros(0, dtype=np.int64)).size == 0
    assert unit_hashes(units[:0]).size == 0
