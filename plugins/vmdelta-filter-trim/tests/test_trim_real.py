"""The trim filter on the real QEMU fixtures: what the trace proves, nothing more or less."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from trim_helpers import changed_units, disk_context
from vmdelta_filter_trim import TrimFilter

from vmdelta_core.plugin import ConfigError
from vmdelta_core.testing import check_filter

pytestmark = pytest.mark.fixtures
UNIT = 4096


def trimmed_units(trace: Path) -> set[int]:
    """Units lying wholly inside one trim request, read straight from the log lines."""
    units: set[int] = set()
    for line in trace.read_text().splitlines():
        m = re.search(r"\.from = (\d+), \.len = (\d+),.*\.type = 4 ", line)
        if m:
            start, length = int(m[1]), int(m[2])
            units.update(range(-(-start // UNIT), (start + length) // UNIT))
    return units


def run(ctx, candidates: np.ndarray) -> np.ndarray:
    filt = TrimFilter()
    return check_filter(filt, ctx, candidates).drop


def every_unit(ctx) -> np.ndarray:
    return np.arange(ctx.modified.size // UNIT, dtype=np.int64)


@pytest.mark.parametrize("log", ["trim-trace.log", "trace-full.log"])
def test_discard_ignore_drops_exactly_what_the_trace_proves(fixture_set: Path, log: str) -> None:
    folder = fixture_set / "variants" / "discard-ignore"
    ctx = disk_context(folder / "base.img", folder / "modified.img", folder / log)
    everything = every_unit(ctx)
    drop = run(ctx, everything)
    proven = trimmed_units(folder / "trim-trace.log")
    assert set(everything[drop].tolist()) == proven
    # the fixture's own count: 11110 trimmed 4 KiB blocks
    assert len(proven) == 11110
    units = ctx.modified.data.reshape(-1, UNIT)
    nonzero = units[everything[drop]].any(axis=1)
    # the NBD server ignored the discards: 2792 of those blocks still hold stale data, and that
    # stale data is the base's (the guest deleted files it had at A), so rebuilding them from the
    # base gives the guest exactly the bytes the modified disk has
    assert int(nonzero.sum()) == 2792
    assert np.array_equal(units[everything[drop]], ctx.base.data.reshape(-1, UNIT)[everything[drop]])
    # and none of the units that changed between the snapshots was trimmed
    changed = changed_units(ctx)
    assert changed.size == 4875
    assert not run(ctx, changed).any()


def test_primary_drops_the_trimmed_changed_units(fixture_set: Path) -> None:
    ctx = disk_context(fixture_set / "base.img", fixture_set / "modified.img", fixture_set / "trim-trace.log")
    changed = changed_units(ctx)
    drop = run(ctx, changed)
    dropped = changed[drop]
    # discard=unmap: every trimmed block reads as zero in the modified disk; 2729 of them held
    # data at A and so are changed units (fixture SUMMARY: "changed 2729")
    assert dropped.size == 2729
    assert set(dropped.tolist()) <= trimmed_units(fixture_set / "trim-trace.log")
    assert not ctx.modified.data.reshape(-1, UNIT)[dropped].any()
    # the rebuilt disk (dropped units from the base) differs from the modified one only there
    rebuilt = np.array(ctx.modified.data).reshape(-1, UNIT)
    rebuilt[dropped] = ctx.base.data.reshape(-1, UNIT)[dropped]
    differs = np.flatnonzero((rebuilt != ctx.modified.data.reshape(-1, UNIT)).any(axis=1))
    assert np.array_equal(differs, dropped)


def test_full_trace_agrees_with_the_trim_only_trace(fixture_set: Path) -> None:
    full = disk_context(fixture_set / "base.img", fixture_set / "modified.img", fixture_set / "trace-full.log")
    trims = disk_context(fixture_set / "base.img", fixture_set / "modified.img", fixture_set / "trim-trace.log")
    changed = changed_units(full)
    assert np.array_equal(run(full, changed), run(trims, changed))


def test_a_write_after_the_trims_keeps_its_unit(fixture_set: Path, tmp_path: Path) -> None:
    trace = fixture_set / "trace-full.log"
    lines = trace.read_text().splitlines()
    last = max(lines, key=lambda line: line.split(":", 1)[0])
    trimmed = sorted(trimmed_units(fixture_set / "trim-trace.log"))
    victim = trimmed[len(trimmed) // 2]
    stamp = last.split(":", 1)[0]
    pid, _, when = stamp.partition("@")
    sec, _, usec = when.partition(".")
    later = f"{pid}@{sec}.{int(usec) + 1:06d}" if int(usec) < 999_999 else f"{pid}@{int(sec) + 1}.000000"
    extra = (
        f"{later}:nbd_send_request Sending request to server: {{ .from = {victim * UNIT + 512}, .len = 512, "
        f".handle = 1, .flags = 0x0, .type = 1 (write) }}"
    )
    edited = tmp_path / "trace.log"
    edited.write_text("\n".join([*lines, extra]) + "\n")
    ctx = disk_context(fixture_set / "base.img", fixture_set / "modified.img", edited)
    candidates = np.array(trimmed, dtype=np.int64)
    drop = run(ctx, candidates)
    assert drop.sum() == len(trimmed) - 1
    assert not drop[trimmed.index(victim)]


def test_a_trace_of_a_bigger_disk_is_refused(fixture_set: Path, tmp_path: Path) -> None:
    # the same trace against a disk half the size: requests fall beyond its end
    small = tmp_path / "small.img"
    with open(fixture_set / "modified.img", "rb") as f:
        small.write_bytes(f.read(32 << 20))
    ctx = disk_context(small, small, fixture_set / "trim-trace.log")
    with pytest.raises(ConfigError, match="another disk"):
        run(ctx, np.arange(16, dtype=np.int64))
