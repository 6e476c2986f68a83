"""Building real ext2/3/4 images with e2fsprogs (and partition tables with sfdisk) for the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.plugin import FilterContext, SourceImage, map_readonly

MIB = 1 << 20


def need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install e2fsprogs fdisk)")


def tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def mkfs(path: Path, size: int, *args: str, offset: int = 0, populate: Path | None = None) -> None:
    """An ext filesystem of ``size`` bytes at ``offset`` of ``path`` (created sparse if needed)."""
    need("mke2fs")
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(offset + size)
    extra = ["-E", f"offset={offset}"] if offset else []
    contents = ["-d", str(populate)] if populate else []
    subprocess.run(
        [tool("mke2fs"), "-q", "-F", *args, *extra, *contents, str(path), f"{size // 1024}k"],
        check=True,
        capture_output=True,
    )


def partition(path: Path, size: int, script: str) -> None:
    need("sfdisk")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run([tool("sfdisk"), "-q", str(path)], input=script, text=True, check=True, capture_output=True)


def dumpe2fs_free(path: Path, offset: int = 0) -> set[int]:
    """Free blocks of the filesystem at ``offset`` of ``path``, as e2fsprogs sees them."""
    need("dumpe2fs")
    target = f"{path}?offset={offset}" if offset else str(path)
    out = subprocess.run(
        [tool("dumpe2fs"), target],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    free: set[int] = set()
    for line in re.findall(r"^  Free blocks: (.*)$", out, re.M):
        for part in filter(None, line.split(", ")):
            a, _, b = part.partition("-")
            free.update(range(int(a), int(b or a) + 1))
    return free


def blocks_of(lo: np.ndarray, hi: np.ndarray, block_size: int, offset: int = 0) -> set[int]:
    out: set[int] = set()
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        out.update(range((a - offset) // block_size, (b - offset) // block_size))
    return out


def disk_context(base: np.ndarray, modified: np.ndarray, **options: object) -> FilterContext:
    return FilterContext("disk0", "disk", 4096, SourceImage("disk", base), SourceImage("disk", modified), None, options)


def mapped(path: Path) -> np.ndarray:
    return map_readonly(path)[0]
