"""The pieces shards are made of, in one process: ranges that cut the image where its digest
chunks start, change detection over a range, and range digests that join into the image's."""

from __future__ import annotations

import itertools
from pathlib import Path

import attrs
import numpy as np
import pytest

from vmdelta_core import Filter, FilterContext, FilterResult, SourceImage, hookimpl
from vmdelta_core.api import CreateConfig, FilterSpec, ImageSpec, create_overlay
from vmdelta_core.create import shards
from vmdelta_core.create.changes import changed_units
from vmdelta_core.create.shards import _ChunkDigests, _JoinedDigest, shard_ranges
from vmdelta_core.overlay.digest import ImageDigest
from vmdelta_core.testing import registry_with

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


class EveryThird(Filter):
    """Drops every third changed unit it is shown: a filter whose choice depends on all of them,
    which shards must therefore run over the whole image, as one process does."""

    name = "every-third"

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        return FilterResult(np.arange(candidates.size) % 3 == 2, "in-test", {"seen": int(candidates.size)})


class Plugin:
    @hookimpl
    def vmdelta_register_filters(self, register) -> None:
        register(EveryThird())


@pytest.mark.fixtures
def test_stages_in_one_process_make_the_overlay_of_create_with_a_filter(realistic: Path, tmp_path: Path) -> None:
    """Scan, select, encode and merge called in turn: the overlay is create's, byte for byte, with
    a filter that drops units (the digest then taken of the image apply rebuilds)."""
    registry = registry_with(Plugin())
    images = [
        ImageSpec("disk", realistic / "base.img", realistic / "modified.img", filters=[FilterSpec("every-third")])
    ]
    config = CreateConfig(output=tmp_path / "shards.overlay", images=images, cache_dir=tmp_path / "cache")
    whole = create_overlay(attrs.evolve(config, output=tmp_path / "whole.overlay"), registry=registry)
    ranges = shards.shard_ranges(config, shards.image_sizes(config, registry), 32 << 20)
    assert len(ranges) == 4
    selection = shards.select_shards(config, [shards.scan_shard(config, r, registry) for r in ranges], registry)
    parts = [shards.part_path(config.output, k) for k in range(len(ranges))]
    counts = [shards.encode_shard(config, r, selection, k, parts[k], registry) for k, r in enumerate(ranges)]
    made = shards.merge_shards(config, ranges, selection, counts, parts, registry)
    assert whole.images[0].statistics.dropped == {"every-third": whole.images[0].statistics.changed // 3}
    assert made.output.read_bytes() == whole.output.read_bytes()
    assert not any(part.exists() for part in parts)
