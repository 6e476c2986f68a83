"""The pieces shards are made of, in one process: ranges that cut the image where its digest
chunks start, change detection over a range, and range digests that join into the image's."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core import SourceImage
from vmdelta_core.api import CreateConfig, ImageSpec
from vmdelta_core.create.changes import changed_units
from vmdelta_core.create.shards import _ChunkDigests, _JoinedDigest, shard_ranges
from vmdelta_core.overlay.digest import ImageDigest

CHUNK = ImageDigest.CHUNK


def image(data: np.ndarray, holes: list[list[int]] | None = None) -> SourceImage:
    return SourceImage(kind="disk", data=data, holes=np.array(holes or [], dtype=np.int64).reshape(-1, 2))


@pytest.mark.parametrize("unit", [4096, 1536])
def test_ranges_cover_every_unit_once_and_start_on_digest_chunks(unit: int, tmp_path: Path) -> None:
    config = CreateConfig(
        output=tmp_path / "o", images=[ImageSpec("disk", "b", "m"), ImageSpec("disk", "b", "m2")], unit_size=unit
    )
    sizes = [5 * CHUNK + 123, 0]
    ranges = shard_ranges(config, sizes, 2 * CHUNK)
    first = [r for r in ranges if r.image == 0]
    assert first[0].first == 0 and first[-1].end == -(-sizes[0] // unit)
    assert all(a.end == b.first for a, b in itertools.pairwise(first))
    assert all(r.first * unit % CHUNK == 0 for r in first)
    assert [r for r in ranges if r.image == 1] == [type(first[0])(1, 0, 0)]  # an empty image: one empty range


def test_ranges_find_the_changes_and_the_digest_of_the_whole_image() -> None:
    rng = np.random.default_rng(5)
    unit, size = 4096, 3 * CHUNK + 5000  # a short last unit in the last range
    base = np.zeros(size, dtype=np.uint8)
    base[: CHUNK // 2] = rng.integers(0, 256, CHUNK // 2, dtype=np.uint8)
    modified = base.copy()
    for at in rng.integers(0, size, 300).tolist():
        modified[at] ^= 0x5A
    modified[2 * CHUNK : 2 * CHUNK + 10 * unit] = 7  # a run of new data past the base's data
    holes = [[CHUNK, CHUNK]]  # the second chunk reads as zeros in both
    modified[CHUNK : 2 * CHUNK] = 0
    whole_digest = ImageDigest()
    whole = changed_units(image(base, holes), image(modified, holes), unit, digest=whole_digest)
    parts, found = [], []
    for first in range(0, -(-size // unit), CHUNK // unit):
        digest = _ChunkDigests()
        found.append(
            changed_units(
                image(base, holes), image(modified, holes), unit, digest=digest, start=first, stop=first + CHUNK // unit
            )
        )
        parts.append(digest.parts())
    assert np.concatenate(found).tolist() == whole.tolist()
    assert _JoinedDigest(b"".join(parts), size).hexdigest() == whole_digest.hexdigest()
