"""The image digest read from a file: through a map of an output only vmdelta holds, it is the
digest of the same bytes read out chunk by chunk, holes, partial chunks and old overlays' whole-
image digest included."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.fileio import punch_hole
from vmdelta_core.overlay.digest import ImageDigest, WholeImageDigest, file_digest, own_file_digest

CHUNK = ImageDigest.CHUNK


def sparse_file(path: Path, size: int, data: list[tuple[int, int]], seed: int = 0) -> Path:
    """A file of ``size`` bytes: random bytes in the ``(start, length)`` ranges, holes elsewhere."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for start, length in data:
            f.seek(start)
            f.write(rng.integers(0, 256, length, dtype=np.uint8).tobytes())
    return path


LAYOUTS = {
    "empty": (0, []),
    "one byte": (1, [(0, 1)]),
    "all holes": (3 * CHUNK + 5, []),
    "dense, partial last chunk": (CHUNK + 4096 * 3 + 17, [(0, CHUNK + 4096 * 3 + 17)]),
    "data straddling chunks": (4 * CHUNK, [(CHUNK - 4096, 8192), (3 * CHUNK + 100, 4096)]),
    "two extents in one chunk": (2 * CHUNK, [(4096, 4096), (CHUNK - 8192, 4096)]),
    "data at the very end": (2 * CHUNK + 12288, [(2 * CHUNK + 8192, 4096)]),
}


@pytest.mark.parametrize("kind", [ImageDigest, WholeImageDigest], ids=["chunked", "whole"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_the_mapped_digest_is_the_digest_of_the_bytes(tmp_path: Path, layout: str, kind: type[ImageDigest]) -> None:
    size, data = LAYOUTS[layout]
    path = sparse_file(tmp_path / "image", size, data)
    expected = kind()
    expected.update(path.read_bytes())
    assert own_file_digest(path, kind) == file_digest(path, kind) == expected.hexdigest()


def test_a_hole_punched_after_writing_reads_as_zeros(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "image", 2 * CHUNK, [(0, 2 * CHUNK)], seed=4)
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, CHUNK // 2, CHUNK)
    finally:
        os.close(fd)
    expected = ImageDigest()
    expected.update(path.read_bytes())
    assert own_file_digest(path) == expected.hexdigest()


def test_the_mapped_digest_of_a_real_disk_is_its_recorded_one(realistic: Path) -> None:
    image = realistic / "modified.img"
    assert own_file_digest(image) == file_digest(image)
