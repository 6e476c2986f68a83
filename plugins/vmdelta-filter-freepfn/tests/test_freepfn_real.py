"""The freepfn filter on the real raw pc.ram images of the QEMU 7.2 x-ignore-shared fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from freepfn_helpers import changed_units, memory_context, pfn_set
from vmdelta_filter_freepfn import FreePfnFilter

from vmdelta_core.plugin import ConfigError, map_readonly
from vmdelta_core.testing import check_filter

pytestmark = pytest.mark.fixtures


@pytest.fixture(scope="module")
def ram(fixture_set: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = fixture_set / "variants" / "qemu-7.2-ignore-shared"
    base, _ = map_readonly(folder / "base-ram.raw")
    modified, _ = map_readonly(folder / "modified-ram.raw")
    return folder, base, modified


def test_drops_exactly_the_changed_pages_free_at_b(ram) -> None:
    folder, base, modified = ram
    changed = changed_units(base, modified)
    ctx = memory_context(base, modified, folder / "free-pfns-B.txt")
    result = check_filter(FreePfnFilter(), ctx, changed)
    free = pfn_set(folder / "free-pfns-B.txt")
    assert len(free) == 5224  # fixture SUMMARY: 5224 pages in 577 ranges
    expected = np.array([pfn in free for pfn in changed.tolist()])
    assert np.array_equal(result.drop, expected)
    assert changed.size == 12743 and int(result.drop.sum()) == 5121
    assert result.details["free_pages"] == 5224 and result.details["dropped"] == 5121
    # every free frame is in the guest's System RAM (/proc/iomem of the guest)
    ranges = []
    for line in (folder / "guest-iomem.txt").read_text().splitlines():
        lo, hi = line.split(" : ")[0].split("-")
        ranges.append((int(lo, 16) // 4096, (int(hi, 16) + 1) // 4096))
    assert all(any(lo <= pfn < hi for lo, hi in ranges) for pfn in free)


def test_rebuilt_image_differs_only_in_free_pages(ram) -> None:
    folder, base, modified = ram
    changed = changed_units(base, modified)
    ctx = memory_context(base, modified, folder / "free-pfns-B.txt")
    dropped = changed[FreePfnFilter().select(ctx, changed).drop]
    rebuilt = np.array(modified).reshape(-1, 4096)
    rebuilt[dropped] = base.reshape(-1, 4096)[dropped]
    differs = np.flatnonzero((rebuilt != modified.reshape(-1, 4096)).any(axis=1))
    assert np.array_equal(differs, dropped)
    assert set(differs.tolist()) <= pfn_set(folder / "free-pfns-B.txt")


def test_kpageflags_dump_of_the_same_snapshot_is_conservative(ram, tmp_path: Path) -> None:
    folder, base, modified = ram
    # a dump as the kernel writes it: only the first page of each free run carries KPF_BUDDY
    flags = np.zeros(modified.size // 4096, dtype="<u8")
    for line in (folder / "free-pfns-B.txt").read_text().splitlines():
        flags[int(line.split()[0])] = 1 << 10
    dump = tmp_path / "kpageflags"
    dump.write_bytes(flags.tobytes())
    changed = changed_units(base, modified)
    exact = FreePfnFilter().select(memory_context(base, modified, folder / "free-pfns-B.txt"), changed).drop
    heads = FreePfnFilter().select(memory_context(base, modified, dump), changed).drop
    assert heads.sum() > 0 and heads.sum() < exact.sum()
    assert not np.any(heads & ~exact)


def test_a_list_of_a_bigger_guest_is_refused(ram, tmp_path: Path) -> None:
    folder, base, modified = ram
    text = (folder / "free-pfns-B.txt").read_text() + f"{modified.size // 4096 + 100} 16\n"
    bigger = tmp_path / "free.txt"
    bigger.write_text(text)
    with pytest.raises(ConfigError, match="not guest RAM"):
        FreePfnFilter().select(memory_context(base, modified, bigger), changed_units(base, modified))


def test_through_the_qemu_stream_block_table_matches_the_fixture_count(fixture_set: Path) -> None:
    """With the QEMU source installed: the primary 7.2 stream, its RAM block table, and the
    fixture script's own count of changed pages lying in free PFNs at B (4466)."""
    from vmdelta_core.plugin import PluginError
    from vmdelta_core.testing import default_registry

    try:
        source = default_registry().source("qemu")
    except PluginError:
        pytest.skip("vmdelta-source-qemu is not installed")
    base = source.open(fixture_set / "base.mem", kind="memory", options={})
    modified = source.open(fixture_set / "modified.mem", kind="memory", options={})
    changed = changed_units(base.data, modified.data)
    ctx = memory_context(base.data, modified.data, fixture_set / "free-pfns-B.txt", layout=dict(modified.layout))
    result = check_filter(FreePfnFilter(), ctx, changed)
    assert changed.size == 12502 and int(result.drop.sum()) == 4466
