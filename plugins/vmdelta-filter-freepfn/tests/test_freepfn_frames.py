from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from vmdelta_filter_freepfn import KPF_BUDDY, read_free_frames

from vmdelta_core.errors import ConfigError, FormatError


def test_ranges_with_comments_and_hex(tmp_path: Path) -> None:
    path = tmp_path / "free.txt"
    path.write_text("# free at B\n1 2\n\n0x10 3  # hex start\n19 1\n")
    frames = read_free_frames(path)
    assert frames.format == "ranges"
    assert frames.starts.tolist() == [1, 16, 19] and frames.counts.tolist() == [2, 3, 1]
    assert frames.pages == 6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2\nabc\n", "line 2: expected"),
        ("1 2 3\n", "line 1: expected"),
        ("5 0\n", "COUNT > 0"),
        ("10 5\n12 1\n", "line 2: PFN 12 is out of order"),
        ("10 5\n3 1\n", "out of order"),
    ],
)
def test_bad_range_lists_are_format_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "free.txt"
    path.write_text(text)
    with pytest.raises(FormatError, match=message):
        read_free_frames(path)


def test_empty_list_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "free.txt"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no free page frames"):
        read_free_frames(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_free_frames(tmp_path / "absent.txt")


def test_kpageflags_dump_counts_only_buddy_heads(tmp_path: Path) -> None:
    flags = np.zeros(64, dtype="<u8")
    flags[[3, 4, 5, 40]] = 1 << KPF_BUDDY
    flags[[6, 7]] = 1 << 5  # LRU pages, not free
    flags[9] = (1 << KPF_BUDDY) | (1 << 4)
    path = tmp_path / "kpageflags"
    path.write_bytes(flags.tobytes())
    frames = read_free_frames(path)
    assert frames.format == "kpageflags"
    assert frames.starts.tolist() == [3, 9, 40] and frames.counts.tolist() == [3, 1, 1]


def test_truncated_kpageflags_dump(tmp_path: Path) -> None:
    path = tmp_path / "kpageflags"
    path.write_bytes(b"\0" * 20)
    with pytest.raises(FormatError, match="8-byte"):
        read_free_frames(path)


def test_unknown_format_option(tmp_path: Path) -> None:
    path = tmp_path / "free.txt"
    path.write_text("1 1\n")
    with pytest.raises(ConfigError, match="format"):
        read_free_frames(path, "bitmap")
