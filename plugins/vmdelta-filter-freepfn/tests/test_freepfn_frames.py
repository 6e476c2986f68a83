from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vmdelta_filter_freepfn import KPF_BUDDY, detect_format, read_free_frames

from vmdelta_core.plugin import ConfigError, FormatError

#: a 1 MiB guest: PFNs 0-255
RAM = np.array([[0, 256]], dtype=np.int64)
#: a guest split around a hole: PFNs 0-99 and 200-255
SPLIT = np.array([[0, 100], [200, 256]], dtype=np.int64)


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "free.txt"
    if isinstance(content, str):
        path.write_text(content, newline="")
    else:
        path.write_bytes(content)
    return path


def dump(tmp_path: Path, flags: np.ndarray) -> Path:
    path = tmp_path / "kpageflags"
    path.write_bytes(np.asarray(flags, dtype="<u8").tobytes())
    return path


def test_ranges_with_comments_and_hex(tmp_path: Path) -> None:
    frames = read_free_frames(write(tmp_path, "# free at B\n1 2\n\n0x10 3  # hex start\n19\t1\r\n0XfF 1"), RAM)
    assert frames.format == "ranges"
    assert frames.starts.tolist() == [1, 16, 19, 255] and frames.counts.tolist() == [2, 3, 1, 1]
    assert frames.pages == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2\nabc\n", "line 2: expected"),
        ("1 2 3\n", "line 1: expected"),
        ("5 0\n", "COUNT > 0"),
        ("10 5\n12 1\n", "line 2: PFN 12 is out of order"),
        ("10 5\n3 1\n", "out of order"),
        # only decimal and 0x hex: Python's other integer spellings are not the documented syntax
        ("-1 2\n", "line 1: expected"),
        ("+5 1\n", "line 1: expected"),
        ("1_0 1\n", "line 1: expected"),
        ("0o7 1\n", "line 1: expected"),
        ("0b1 1\n", "line 1: expected"),
        ("010 1\n", "line 1: expected"),
        ("1 1\n2 0x\n", "line 2: expected"),
        (f"1 1\n{'9' * 40} 1\n", "line 2: 9999.* too long"),
    ],
)
def test_bad_range_lists_are_format_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_free_frames(write(tmp_path, text), RAM)


@pytest.mark.parametrize(
    "content",
    [
        b"1 1\n2 1\x0c\n",  # a form feed: str.splitlines() would have made it a line break
        "1 1 # caf\u00e9\n".encode(),  # not ASCII, even in a comment
        b"1 1\n\x002 1\n",
    ],
)
def test_a_list_must_be_printable_ascii(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(FormatError, match="not printable ASCII") as caught:
        read_free_frames(write(tmp_path, content), RAM, "ranges")
    assert "not printable ASCII" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (f"{2**52 + 8} 1", f"{2**52 + 8}\\+1"),  # x 4096 wraps to byte 32768, page 8, in 64 bits
        ("1 1152921504606846976", "1\\+1152921504606846976"),  # a huge count
        ("8 249", "8\\+249"),  # one page past the end
        ("256 1", "256\\+1"),
        (f"{2**63} 1", f"{2**63}\\+1"),  # does not fit int64
        ("0x8000000000000000 1", f"{2**63}\\+1"),
        ("0xffffffffffffffff 1", f"{2**64 - 1}\\+1"),
        (f"{2**64 + 3} 1", f"{2**64 + 3}\\+1"),
        (f"1 {2**63}", f"1\\+{2**63}"),
    ],
)
def test_ranges_outside_the_ram_are_refused_with_their_line(tmp_path: Path, line: str, shown: str) -> None:
    path = write(tmp_path, f"0 1\n# comment\n{line}\n")
    with pytest.raises(ConfigError, match=f"free.txt line 3: free PFN range {shown} is not guest RAM") as caught:
        read_free_frames(path, RAM)
    assert "guest RAM is PFNs 0-255" in str(caught.value)


def test_ranges_in_a_hole_between_ram_runs_are_refused(tmp_path: Path) -> None:
    assert read_free_frames(write(tmp_path, "98 2\n200 56\n"), SPLIT).pages == 58
    for text in ("98 3\n", "150 1\n", "199 2\n"):
        with pytest.raises(ConfigError, match=r"line 1: .* not guest RAM \(guest RAM is PFNs 0-99, 200-255\)"):
            read_free_frames(write(tmp_path, text), SPLIT)


def test_empty_list_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no free page frames"):
        read_free_frames(write(tmp_path, "# nothing\n"), RAM)
    with pytest.raises(ConfigError, match="no free page frames"):
        read_free_frames(write(tmp_path, b""), RAM)
    with pytest.raises(ConfigError, match="cannot read"):
        read_free_frames(tmp_path / "absent.txt", RAM)


def test_kpageflags_dump_counts_only_buddy_heads(tmp_path: Path) -> None:
    flags = np.zeros(64, dtype="<u8")
    flags[[3, 4, 5, 40]] = 1 << KPF_BUDDY
    flags[[6, 7]] = 1 << 5  # LRU pages, not free
    flags[9] = (1 << KPF_BUDDY) | (1 << 4)
    flags[10] = 1 << 32 | 1 << 42  # KPF_RESERVED and KPF_ARCH_3, the kernel's own bits
    frames = read_free_frames(dump(tmp_path, flags), RAM)
    assert frames.format == "kpageflags"
    assert frames.starts.tolist() == [3, 9, 40] and frames.counts.tolist() == [3, 1, 1]


def test_kpageflags_dump_may_run_past_the_ram(tmp_path: Path) -> None:
    # the kernel rounds the dump up to a memory section; frames past the RAM are not free
    flags = np.full(1024, 1 << 20, dtype="<u8")  # KPF_NOPAGE
    flags[:256] = 0
    flags[7] = 1 << KPF_BUDDY
    assert read_free_frames(dump(tmp_path, flags), RAM).starts.tolist() == [7]


def test_kpageflags_free_page_outside_the_ram_is_refused(tmp_path: Path) -> None:
    flags = np.zeros(512, dtype="<u8")
    flags[[7, 300]] = 1 << KPF_BUDDY
    with pytest.raises(ConfigError, match="entry 300 \\(byte 2400\\): PFN 300 is marked free but is not guest RAM"):
        read_free_frames(dump(tmp_path, flags), RAM)
    flags[300] = 0
    flags[150] = 1 << KPF_BUDDY
    with pytest.raises(ConfigError, match=r"PFN 150 .* not guest RAM"):
        read_free_frames(dump(tmp_path, flags), SPLIT)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1 << 27, "entry 5 is 0x8000000, with flag bits 0x8000000 that no kernel defines"),
        ((1 << KPF_BUDDY) | (1 << 63), "entry 5 is 0x8000000000000400, with flag bits 0x8000000000000000 that no"),
        ((1 << KPF_BUDDY) | (1 << 20), "entry 5 is 0x100400: a frame without a page \\(KPF_NOPAGE\\) has no other"),
    ],
)
def test_kpageflags_with_impossible_flags_is_refused(tmp_path: Path, value: int, message: str) -> None:
    flags = np.zeros(64, dtype="<u8")
    flags[3] = 1 << KPF_BUDDY
    flags[5] = value
    with pytest.raises(FormatError, match=f"not a kpageflags dump: {message}"):
        read_free_frames(dump(tmp_path, flags), RAM, "kpageflags")


def test_truncated_or_empty_kpageflags_dump(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="20 bytes are not a whole number of 8-byte entries"):
        read_free_frames(write(tmp_path, b"\0" * 20), RAM)
    with pytest.raises(FormatError, match="not a kpageflags dump: it is empty"):
        read_free_frames(write(tmp_path, b""), RAM, "kpageflags")
    with pytest.raises(ConfigError, match="marks no page as a free buddy block"):
        read_free_frames(write(tmp_path, b"\0" * 64), RAM)


def test_random_bytes_with_a_nul_are_neither_format(tmp_path: Path) -> None:
    data = np.random.default_rng(6).bytes(4096)
    assert b"\0" in data
    with pytest.raises(FormatError, match=r"is neither a text PFN list \(byte .*\) nor a kpageflags dump \(entry 0"):
        read_free_frames(write(tmp_path, data), np.array([[0, 1 << 20]]))


def test_detection_follows_the_structure() -> None:
    path = Path("free")
    assert detect_format(b"1 2\n", path) == "ranges"
    assert detect_format(b"", path) == "ranges"
    assert detect_format(np.array([1 << KPF_BUDDY, 0], dtype="<u8").tobytes(), path) == "kpageflags"
    # a list with a stray NUL is not taken for a dump: 4 bytes are not a whole entry
    with pytest.raises(FormatError, match="neither"):
        detect_format(b"1 2\0", path)


def test_forcing_the_format(tmp_path: Path) -> None:
    flags = np.zeros(64, dtype="<u8")
    flags[3] = 1 << KPF_BUDDY
    path = dump(tmp_path, flags)
    assert read_free_frames(path, RAM, "kpageflags").starts.tolist() == [3]
    with pytest.raises(FormatError, match="kpageflags is not a text PFN list: byte 0 on line 1 is 0x00"):
        read_free_frames(path, RAM, "ranges")
    text = write(tmp_path, "1 2\n3 4\n")  # 8 bytes of text: a whole entry, with bits no kernel sets
    with pytest.raises(FormatError, match=r"free.txt is not a kpageflags dump: entry 0 is 0x"):
        read_free_frames(text, RAM, "kpageflags")
    assert read_free_frames(text, RAM, "ranges").pages == 6


@pytest.mark.parametrize("fmt", ["bitmap", "list", "", 1, None])
def test_unknown_format_option(tmp_path: Path, fmt: object) -> None:
    with pytest.raises(ConfigError, match=r"option format=.* must be auto, ranges or kpageflags"):
        read_free_frames(write(tmp_path, "1 1\n"), RAM, fmt)  # type: ignore[arg-type]


def test_big_inputs_are_checked_chunk_by_chunk(tmp_path: Path) -> None:
    # 2.5 chunks of entries: runs and errors across chunk boundaries keep their place
    chunk = 1 << 20
    ram = np.array([[0, 3 * chunk]], dtype=np.int64)
    flags = np.zeros(5 * chunk // 2, dtype="<u8")
    flags[[5, chunk - 1, chunk, 2 * chunk + 7]] = 1 << KPF_BUDDY
    frames = read_free_frames(dump(tmp_path, flags), ram)
    assert frames.starts.tolist() == [5, chunk - 1, 2 * chunk + 7] and frames.counts.tolist() == [1, 2, 1]
    flags[2 * chunk + 9] = 1 << 30
    with pytest.raises(FormatError, match=f"entry {2 * chunk + 9} is 0x40000000, with flag bits"):
        read_free_frames(dump(tmp_path, flags), ram, "kpageflags")
    text = b"0 1\n" * (3 * chunk // 4) + b"# caf\xc3\xa9\n"
    with pytest.raises(FormatError, match=f"byte {3 * chunk + 5} on line {3 * chunk // 4 + 1} is 0xc3"):
        read_free_frames(write(tmp_path, text), ram, "ranges")
