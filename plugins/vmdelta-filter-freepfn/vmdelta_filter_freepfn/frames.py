"""Reading the free guest page frames: a ``START_PFN COUNT`` list or a ``/proc/kpageflags`` dump.

Both are untrusted. Every frame is checked against the guest's RAM (:func:`ram_pages`) in Python
integers as it is read, and refused with its line or entry when it lies outside; only frames
inside the RAM reach numpy, so no later arithmetic on them can overflow. The format is told from
the whole content's structure, not from one byte: a list is printable ASCII in the syntax below,
a dump is whole 8-byte entries with only the flag bits Linux defines.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np

from vmdelta_core.plugin import ConfigError, FormatError
from vmdelta_filter_freepfn.kpageflags import DEFINED_FLAGS, ENTRY_SIZE, KPF_BUDDY, KPF_NOPAGE
from vmdelta_filter_freepfn.ramlayout import RamPages, describe_ram, inside_ram

__all__ = [
    "FORMATS",
    "KPF_BUDDY",
    "FreeFrames",
    "detect_format",
    "parse_kpageflags",
    "parse_ranges",
    "read_free_frames",
]

#: values of option ``format``
FORMATS = ("auto", "ranges", "kpageflags")

#: a number in a list: decimal without leading zeros (``010`` would read as octal elsewhere) or hex
_NUMBER = re.compile(r"0|[1-9][0-9]*|0[xX][0-9a-fA-F]+")
#: longer tokens are no page frame number (a u64 is 20 decimal digits); refused before int()
_MAX_TOKEN = 32

#: the bytes a list may hold: printable ASCII, tab, line feed and carriage return
_TEXT_BYTES = np.zeros(256, dtype=bool)
_TEXT_BYTES[0x20:0x7F] = True
_TEXT_BYTES[[0x09, 0x0A, 0x0D]] = True

#: bytes or entries examined at once: checking the dump of a big guest (2 GiB for 1 TiB of RAM)
#: then needs little memory beside the file's bytes
_CHUNK = 1 << 20


@attrs.frozen
class FreeFrames:
    """Free page frames as sorted, non-overlapping runs ``starts[i] .. starts[i] + counts[i] - 1``.

    The readers below return only runs lying wholly in the guest RAM they were given.
    """

    starts: np.ndarray
    counts: np.ndarray
    format: str

    @property
    def pages(self) -> int:
        return int(self.counts.sum())


def parse_ranges(text: str, path: Path, ram: RamPages) -> FreeFrames:
    """``START_PFN COUNT`` per line (decimal or ``0x`` hex), sorted, not overlapping, inside ``ram``.

    Blank lines and ``#`` comments are skipped. A line out of order is refused rather than
    sorted: it is the sign of a concatenation of two snapshots' lists.

    :raises FormatError: a line breaks the syntax or the order.
    :raises ConfigError: a range is not wholly guest RAM, or the list is empty.
    """
    firsts, ends = ram[:, 0].tolist(), ram[:, 1].tolist()
    starts: list[int] = []
    counts: list[int] = []
    end = 0
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"freepfn: {path} line {number}"
        fields = line.split()
        if len(fields) != 2 or not all(_NUMBER.fullmatch(field) for field in fields):
            raise FormatError(f"{where}: expected 'START_PFN COUNT' in decimal or 0x hex, got {raw[:60]!r}")
        for field in fields:
            if len(field) > _MAX_TOKEN:
                raise FormatError(f"{where}: {field[:24]}... is too long to be a page frame number")
        start, count = (int(field, 0) for field in fields)
        if count == 0:
            raise FormatError(f"{where}: a range needs COUNT > 0")
        if start < end:
            raise FormatError(f"{where}: PFN {start} is out of order or overlaps the line before")
        run = bisect.bisect_right(firsts, start) - 1
        if run < 0 or count > ends[run] - start:
            raise ConfigError(
                f"{where}: free PFN range {start}+{count} is not guest RAM ({describe_ram(ram)}): "
                f"the list is of another VM or of a bigger guest"
            )
        starts.append(start)
        counts.append(count)
        end = start + count
    if not starts:
        raise ConfigError(f"freepfn: {path} lists no free page frames")
    return FreeFrames(np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64), "ranges")


def parse_kpageflags(data: bytes, path: Path, ram: RamPages) -> FreeFrames:
    """A ``/proc/kpageflags`` dump: one little-endian u64 per PFN from PFN 0.

    Only the *first* page of a free buddy block carries ``KPF_BUDDY``; the order of the block is
    not in the file, so only those head pages count as free. That is conservative: it drops fewer
    pages than are free, never a used one. The dump may run past the RAM (the kernel rounds it up
    to a memory section), but every page it marks free must be guest RAM.

    :raises FormatError: the content is not a kpageflags dump (see :mod:`.kpageflags`).
    :raises ConfigError: a page marked free is not guest RAM, or none is marked free.
    """
    problem = _not_kpageflags(data)
    if problem is not None:
        raise FormatError(f"freepfn: {path} is not a kpageflags dump: {problem}")
    buddy = np.uint64(1 << KPF_BUDDY)
    flags = np.frombuffer(data, dtype="<u8")
    pfns = np.concatenate(
        [np.zeros(0, dtype=np.int64)] + [at + np.flatnonzero(chunk & buddy) for at, chunk in _chunks(flags)]
    )
    if pfns.size == 0:
        raise ConfigError(f"freepfn: {path} marks no page as a free buddy block")
    outside = np.flatnonzero(~inside_ram(ram, pfns, np.ones(pfns.shape, dtype=np.int64)))
    if outside.size:
        pfn = int(pfns[outside[0]])
        raise ConfigError(
            f"freepfn: {path} entry {pfn} (byte {pfn * ENTRY_SIZE}): PFN {pfn} is marked free but is not guest RAM "
            f"({describe_ram(ram)}): the dump is of another VM or of a bigger guest"
        )
    # runs of consecutive PFNs
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = pfns[np.concatenate(([0], breaks))]
    ends = pfns[np.concatenate((breaks - 1, [pfns.size - 1]))] + 1
    return FreeFrames(starts, ends - starts, "kpageflags")


def detect_format(data: bytes, path: Path) -> str:
    """``ranges`` for text, ``kpageflags`` for a well-formed dump, else a :class:`FormatError`.

    The two cannot be confused: byte 3 of every dump entry holds bits 24-31, of which only 24-26
    exist, so it is below 8 and never a text byte.
    """
    not_text = _not_text(data)
    if not_text is None:
        return "ranges"
    not_dump = _not_kpageflags(data)
    if not_dump is None:
        return "kpageflags"
    raise FormatError(f"freepfn: {path} is neither a text PFN list ({not_text}) nor a kpageflags dump ({not_dump})")


def read_free_frames(path: Path, ram: RamPages, fmt: str = "auto") -> FreeFrames:
    """Read ``path`` as ``fmt`` (``ranges``, ``kpageflags`` or ``auto``: told by structure),
    keeping only frames inside ``ram`` and refusing the file otherwise."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ConfigError(f"freepfn: option format={fmt!r} must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"freepfn: cannot read {path}: {exc.strerror}") from None
    if fmt == "auto":
        fmt = detect_format(data, path)
    if fmt == "kpageflags":
        return parse_kpageflags(data, path, ram)
    not_text = _not_text(data)
    if not_text is not None:
        raise FormatError(f"freepfn: {path} is not a text PFN list: {not_text}")
    return parse_ranges(data.decode("ascii"), path, ram)


def _chunks(array: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for at in range(0, array.size, _CHUNK):
        yield at, array[at : at + _CHUNK]


def _not_text(data: bytes) -> str | None:
    """Why ``data`` is not a text list, or ``None`` when every byte is printable ASCII or a line end."""
    for at, chunk in _chunks(np.frombuffer(data, dtype=np.uint8)):
        bad = np.flatnonzero(~_TEXT_BYTES[chunk])
        if bad.size:
            at += int(bad[0])
            line = data.count(b"\n", 0, at) + 1
            return f"byte {at} on line {line} is {data[at]:#04x}, not printable ASCII"
    return None


def _not_kpageflags(data: bytes) -> str | None:
    """Why ``data`` is not a kpageflags dump, or ``None`` when its structure is one."""
    if not data:
        return "it is empty"
    if len(data) % ENTRY_SIZE:
        return f"{len(data)} bytes are not a whole number of 8-byte entries"
    undefined = np.uint64(~DEFINED_FLAGS & (2**64 - 1))
    nopage = np.uint64(1 << KPF_NOPAGE)
    for at, chunk in _chunks(np.frombuffer(data, dtype="<u8")):
        wrong = np.flatnonzero(chunk & undefined)
        if wrong.size:
            entry = at + int(wrong[0])
            value = int(chunk[wrong[0]])
            return f"entry {entry} is {value:#x}, with flag bits {value & ~DEFINED_FLAGS:#x} that no kernel defines"
        mixed = np.flatnonzero(((chunk & nopage) != 0) & (chunk != nopage))
        if mixed.size:
            entry = at + int(mixed[0])
            value = int(chunk[mixed[0]])
            return f"entry {entry} is {value:#x}: a frame without a page (KPF_NOPAGE) has no other flags"
    return None
