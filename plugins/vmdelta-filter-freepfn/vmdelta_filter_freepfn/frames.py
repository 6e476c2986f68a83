"""Reading the free guest page frames: a ``START_PFN COUNT`` list or a ``/proc/kpageflags`` dump."""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from vmdelta_core.errors import ConfigError, FormatError

__all__ = ["KPF_BUDDY", "FreeFrames", "parse_kpageflags", "parse_ranges", "read_free_frames"]

#: ``/proc/kpageflags`` bit of the first page of a free buddy block
KPF_BUDDY = 10


@attrs.frozen
class FreeFrames:
    """Free page frames as sorted, non-overlapping runs ``starts[i] .. starts[i] + counts[i] - 1``."""

    starts: np.ndarray
    counts: np.ndarray
    format: str

    @property
    def pages(self) -> int:
        return int(self.counts.sum())


def parse_ranges(text: str, path: Path) -> FreeFrames:
    """``START_PFN COUNT`` per line (decimal or ``0x`` hex), sorted, not overlapping.

    Blank lines and ``#`` comments are skipped. A line out of order is refused rather than
    sorted: it is the sign of a concatenation of two snapshots' lists.
    """
    starts: list[int] = []
    counts: list[int] = []
    end = -1
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            start, count = (int(field, 0) for field in fields)
        except ValueError:
            raise FormatError(f"freepfn: {path} line {number}: expected 'START_PFN COUNT', got {raw[:60]!r}") from None
        if start < 0 or count <= 0:
            raise FormatError(f"freepfn: {path} line {number}: a range needs START >= 0 and COUNT > 0")
        if start < end:
            raise FormatError(f"freepfn: {path} line {number}: PFN {start} is out of order or overlaps the line before")
        starts.append(start)
        counts.append(count)
        end = start + count
    if not starts:
        raise ConfigError(f"freepfn: {path} lists no free page frames")
    return FreeFrames(np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64), "ranges")


def parse_kpageflags(data: np.ndarray, path: Path) -> FreeFrames:
    """A ``/proc/kpageflags`` dump: one little-endian u64 per PFN from PFN 0.

    Only the *first* page of a free buddy block carries ``KPF_BUDDY``; the order of the block is
    not in the file, so only those head pages count as free. That is conservative: it drops fewer
    pages than are free, never a used one.
    """
    if data.size % 8:
        raise FormatError(f"freepfn: {path} is {data.size} bytes, not a whole number of 8-byte kpageflags entries")
    flags = data.view("<u8")
    pfns = np.flatnonzero((flags >> np.uint64(KPF_BUDDY)) & np.uint64(1)).astype(np.int64)
    if pfns.size == 0:
        raise ConfigError(f"freepfn: {path} marks no page as a free buddy block")
    # runs of consecutive PFNs
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = pfns[np.concatenate(([0], breaks))]
    ends = pfns[np.concatenate((breaks - 1, [pfns.size - 1]))] + 1
    return FreeFrames(starts, ends - starts, "kpageflags")


def read_free_frames(path: Path, fmt: str = "auto") -> FreeFrames:
    """Read ``path`` as ``fmt`` (``ranges``, ``kpageflags`` or ``auto``: binary means kpageflags)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"freepfn: cannot read {path}: {exc.strerror}") from None
    if fmt == "auto":
        fmt = "kpageflags" if b"\0" in raw[:65536] else "ranges"
    if fmt == "kpageflags":
        return parse_kpageflags(np.frombuffer(raw, dtype=np.uint8), path)
    if fmt == "ranges":
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise FormatError(f"freepfn: {path} byte {exc.start}: not a text PFN list") from None
        return parse_ranges(text, path)
    raise ConfigError(f"freepfn: option format={fmt!r} must be auto, ranges or kpageflags")
