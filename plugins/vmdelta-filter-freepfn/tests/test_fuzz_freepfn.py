"""Hostile free-page inputs end in a correct result or a clean VmdeltaError, never anything else.

Every accepted input is checked against a plain reference reading of the same bytes: the units
dropped are exactly those whose page frame the input lists (or marks as a buddy head), and every
listed frame is guest RAM. Structured inputs also have an oracle for *whether* they must be
accepted, so a refusal of a good list fails as surely as an acceptance of a bad one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from freepfn_helpers import memory_context
from hypothesis import given
from hypothesis import strategies as st
from vmdelta_filter_freepfn import KPF_BUDDY, FreePfnFilter

from vmdelta_core.plugin import VmdeltaError
from vmdelta_core.testing import check_untrusted, fuzz_settings

PAGE = 4096
NOPAGE = 1 << 20
DEFINED = [*range(27), *range(32, 43)]
UNDEFINED = [*range(27, 32), *range(43, 64)]


class Guest(NamedTuple):
    """A small memory image: its block table, and the page frame of each image unit (or None)."""

    layout: dict[str, Any]
    size: int
    unit_pfn: list[int | None]
    ram: list[tuple[int, int]]

    def in_ram(self, start: int, count: int) -> bool:
        return count > 0 and any(lo <= start and start + count <= hi for lo, hi in self.ram)


def _guest(blocks: list[tuple[str, int, int | None]]) -> Guest:
    """Blocks of ``pages`` pages one after another in the image, at guest PFN ``pfn`` (or none)."""
    table, unit_pfn, ram = [], [], []
    for name, pages, pfn in blocks:
        address = None if pfn is None else pfn * PAGE
        table.append({"name": name, "offset": len(unit_pfn) * PAGE, "length": pages * PAGE, "guest_address": address})
        unit_pfn += [None if pfn is None else pfn + i for i in range(pages)]
        if pfn is not None:
            ram.append((pfn, pfn + pages))
    return Guest({"blocks": table}, len(unit_pfn) * PAGE, unit_pfn, sorted(ram))


GUESTS = [
    # a raw dump of a 64-page guest
    Guest({}, 64 * PAGE, list(range(64)), [(0, 64)]),
    # a ROM first in the image, pc.ram from 0, a DIMM at PFN 100 behind a hole
    _guest([("/rom@etc/acpi/tables", 16, None), ("pc.ram", 48, 0), ("dimm", 16, 100)]),
]
guests = st.sampled_from(GUESTS)
formats = st.sampled_from(["auto", "ranges", "kpageflags"])


def select(guest: Guest, path: Path, fmt: str) -> Any:
    image = np.zeros(guest.size, dtype=np.uint8)
    ctx = memory_context(image, image, path, guest.layout, format=fmt)
    units = np.arange(guest.size // PAGE, dtype=np.int64)
    return check_untrusted("free-pfn list", lambda: FreePfnFilter().select(ctx, units))


def reference_pfns(data: bytes, fmt: str) -> list[tuple[int, int]]:
    """The runs an accepted input lists, read the plain way."""
    if fmt == "kpageflags":
        flags = np.frombuffer(data, dtype="<u8")
        return [(int(pfn), 1) for pfn in np.flatnonzero(flags & np.uint64(1 << KPF_BUDDY))]
    runs = []
    for line in data.decode("ascii").split("\n"):
        fields = line.split("#", 1)[0].split()
        if fields:
            runs.append((int(fields[0], 0), int(fields[1], 0)))
    return runs


def check_outcome(guest: Guest, data: bytes, outcome: Any) -> bool:
    """Check a refusal is one line and an acceptance is right; returns whether it was accepted."""
    if isinstance(outcome, VmdeltaError):
        assert "\n" not in str(outcome) and str(outcome).startswith("freepfn")
        return False
    runs = reference_pfns(data, outcome.details["input_format"])
    assert runs and all(guest.in_ram(start, count) for start, count in runs)
    free = {pfn for start, count in runs for pfn in range(start, start + count)}
    expected = [pfn is not None and pfn in free for pfn in guest.unit_pfn]
    assert outcome.drop.tolist() == expected
    assert outcome.details["free_pages"] == len(free)
    return True


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "free"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# any bytes
# --------------------------------------------------------------------------------------------


@fuzz_settings(100)
@given(data=st.binary(max_size=4096), guest=guests, fmt=formats)
def test_fuzz_random_bytes(tmp_path: Path, data: bytes, guest: Guest, fmt: str) -> None:
    check_outcome(guest, data, select(guest, write(tmp_path, data), fmt))


@fuzz_settings(100)
@given(
    guest=guests,
    edits=st.lists(st.tuples(st.integers(0, 200), st.binary(max_size=3), st.integers(0, 3)), max_size=6),
)
def test_fuzz_mutated_lists(tmp_path: Path, guest: Guest, edits: list[tuple[int, bytes, int]]) -> None:
    data = b"# free at B\n1 2\n0x10 3  # hex\n20\t4\r\n40 1\n"
    for at, insert, remove in edits:
        at %= len(data) + 1
        data = data[:at] + insert + data[at + remove :]
    check_outcome(guest, data, select(guest, write(tmp_path, data), "auto"))


# --------------------------------------------------------------------------------------------
# text lists
# --------------------------------------------------------------------------------------------

#: numbers at the RAM's edges, where 64-bit arithmetic wraps or int64 overflows, and beyond
EDGES = [0, 1, 47, 48, 63, 64, 99, 100, 115, 116, 2**52, 2**52 + 8, 2**52 + 100, 2**63 - 1, 2**63, 2**64 - 1]
EDGES += [2**64, 2**64 + 8, 10**25, 10**40]
numbers = st.one_of(st.integers(0, 130), st.sampled_from(EDGES), st.integers(0, 2**70))


def _spell(n: int, how: int) -> str:
    return (str(n), hex(n), f"0X{n:X}")[how]


@st.composite
def range_lists(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Mostly well-formed lists (rising starts), sometimes with a hostile range slipped in."""
    runs, at = [], draw(st.integers(0, 10))
    for gap, count in draw(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), max_size=8)):
        runs.append((at + gap, count))
        at += gap + count
    if draw(st.booleans()):
        runs.insert(draw(st.integers(0, len(runs))), (draw(numbers), draw(numbers)))
    return runs


def _acceptable(guest: Guest, runs: list[tuple[int, int]]) -> bool:
    end = 0
    for start, count in runs:
        if start < end or not guest.in_ram(start, count):
            return False
        end = start + count
    return bool(runs)


@fuzz_settings(100)
@given(
    guest=guests,
    runs=range_lists(),
    spelling=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from([" ", "\t", "  "])), min_size=9),
    comments=st.lists(st.sampled_from(["", " # free", "\n", "\n# a comment line\n", "\n   \n"]), min_size=9),
    crlf=st.booleans(),
    fmt=st.sampled_from(["auto", "ranges"]),
)
def test_fuzz_range_lists(
    tmp_path: Path,
    guest: Guest,
    runs: list[tuple[int, int]],
    spelling: list[tuple[int, int, str]],
    comments: list[str],
    crlf: bool,
    fmt: str,
) -> None:
    lines = []
    for (start, count), (how_start, how_count, sep), comment in zip(runs, spelling, comments, strict=False):
        lines.append(f"{_spell(start, how_start)}{sep}{_spell(count, how_count)}{comment}")
    data = ("\r\n" if crlf else "\n").join(lines).encode()
    accepted = check_outcome(guest, data, select(guest, write(tmp_path, data), fmt))
    assert accepted == _acceptable(guest, runs)


# --------------------------------------------------------------------------------------------
# kpageflags dumps
# --------------------------------------------------------------------------------------------

flag_words = st.one_of(
    st.just(0),
    st.just(1 << KPF_BUDDY),
    st.just(NOPAGE),
    st.lists(st.sampled_from(DEFINED), max_size=4).map(lambda bits: sum({1 << b for b in bits}) & ~NOPAGE),
)
hostile_words = st.one_of(
    st.sampled_from(UNDEFINED).map(lambda bit: 1 << bit | 1 << KPF_BUDDY),
    st.just(NOPAGE | 1 << KPF_BUDDY),
    st.integers(0, 2**64 - 1),
)


@fuzz_settings(100)
@given(
    guest=guests,
    words=st.lists(flag_words, max_size=160),
    hostile=st.lists(st.tuples(st.integers(0, 200), hostile_words), max_size=2),
    cut=st.sampled_from([0, 0, 0, 1, 3, 7]),
    fmt=st.sampled_from(["auto", "kpageflags"]),
)
def test_fuzz_kpageflags_dumps(
    tmp_path: Path, guest: Guest, words: list[int], hostile: list[tuple[int, int]], cut: int, fmt: str
) -> None:
    for at, word in hostile:
        words.insert(at % (len(words) + 1), word)
    data = np.array(words, dtype="<u8").tobytes()
    data = data[: len(data) - cut] if cut <= len(data) else data
    accepted = check_outcome(guest, data, select(guest, write(tmp_path, data), fmt))
    well_formed = (
        bool(data)
        and len(data) % 8 == 0
        and all(not word & ~sum(1 << b for b in DEFINED) and (not word & NOPAGE or word == NOPAGE) for word in words)
    )
    heads = [pfn for pfn, word in enumerate(words) if word & 1 << KPF_BUDDY]
    if fmt == "kpageflags" or well_formed:
        assert accepted == (well_formed and bool(heads) and all(guest.in_ram(pfn, 1) for pfn in heads))


# --------------------------------------------------------------------------------------------
# block tables (from the memory source, as untrusted as the image)
# --------------------------------------------------------------------------------------------

block_numbers = st.one_of(
    st.integers(-4, 80).map(lambda pages: pages * PAGE),
    st.sampled_from([2**56 - 64 * PAGE, 2**56, 2**63 - PAGE, 2**63, 2**64, -(2**63)]),
    st.integers(-(2**70), 2**70),
    st.sampled_from([None, True, "0", 1.5]),
)
blocks = st.fixed_dictionaries(
    {"name": st.sampled_from(["pc.ram", "dimm", "vga.vram"]), "offset": block_numbers, "length": block_numbers},
    optional={"guest_address": block_numbers},
)


@fuzz_settings(60)
@given(table=st.lists(blocks, max_size=3), start=st.integers(0, 70), count=st.integers(1, 8))
def test_fuzz_block_tables(tmp_path: Path, table: list[dict[str, Any]], start: int, count: int) -> None:
    size = 64 * PAGE
    image = np.zeros(size, dtype=np.uint8)
    free = write(tmp_path, f"{start} {count}\n".encode())
    ctx = memory_context(image, image, free, {"blocks": table})
    units = np.arange(64, dtype=np.int64)
    outcome = check_untrusted("freepfn block table", lambda: FreePfnFilter().select(ctx, units))
    if isinstance(outcome, VmdeltaError):
        assert "\n" not in str(outcome)
        return
    # accepted: every dropped unit is a page of a block mapped at a guest address in the list
    if not table:  # no block table: the image is pc.ram from 0
        table = [{"name": "pc.ram", "offset": 0, "length": size}]
    for unit in units[outcome.drop].tolist():
        owners = [
            b
            for b in table
            if b.get("guest_address") is not None or b["name"] == "pc.ram"
            if b["offset"] <= unit * PAGE and (unit + 1) * PAGE <= b["offset"] + b["length"]
        ]
        assert len(owners) == 1
        (block,) = owners
        address = (block.get("guest_address") or 0) + unit * PAGE - block["offset"]
        assert start * PAGE <= address and address + PAGE <= (start + count) * PAGE
