"""One overlay made in address-range shards, by several processes at once, merged into one file.

The stages of :func:`~vmdelta_core.create.pipeline.create_overlay`, cut where a large image can be
split; each is a function of picklable values, so a task scheduler (Dask, in ``vmdelta batch``)
runs them on any worker that reads the files:

1. :func:`scan_shard`, per range of units, in parallel: the changed units, the range's part of the
   image digest (ranges start on digest chunks), and the hash of every changed unit.
2. :func:`select_shards`, once: the filters over all of an image's changed units (as one process
   runs them), the image digests, and the dedup seed.
3. :func:`encode_shard`, per range, in parallel: dedup and encoding of the range's kept units into
   the items of a part file beside the overlay (compressed fast, for the trip).
4. :func:`merge_shards`, once: the envelopes and the parts' items, in order, framed and compressed
   into the overlay. This is the part that does not run in parallel (beyond the task's threads):
   framing items the way one process does is what makes the overlay that one process makes.

How the shards see each other's units: a unit that a single process would find "same as an
earlier unit" refers to the first unit of the overlay with its bytes. Step 1 hashes every changed
unit; step 2 keeps the hashes of the units the filters kept, in overlay order; step 3 seeds the
shard's dedup with every one of them that lies before the shard (:meth:`Deduplicator.seed`). The
earliest unit of a hash is found first, and every proposed match is still confirmed against the
bytes of the modified image at that address (which every shard reads). The items are then those
of one process, and so, once framed again by the merge, is the overlay, byte for byte.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import xxhash

from vmdelta_core.config import CreateConfig
from vmdelta_core.create.changes import changed_units
from vmdelta_core.create.dedup import DedupBase, Deduplicator
from vmdelta_core.create.filters import select_units
from vmdelta_core.create.pipeline import (
    _checked,
    _digests,
    _metadata,
    _report,
    _skeleton,
    _store_envelope,
    _use_hints,
    _writer,
)
from vmdelta_core.create.plan import OverlayPlan, plan_overlay
from vmdelta_core.create.sources import OpenedPair, index_bases, open_pairs
from vmdelta_core.create.units import BATCH_UNITS, UnitEncoder
from vmdelta_core.index import unit_hashes
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.container import OverlayReader, OverlayWriter
from vmdelta_core.overlay.digest import ImageDigest
from vmdelta_core.overlay.items import join_addresses
from vmdelta_core.overlay.metadata import BaseRecord, EncoderUse, EnvelopeRecord, ImageRecord, ImageStatistics
from vmdelta_core.records import CreateReport, NullProgress
from vmdelta_core.registry import Registry, default_registry

__all__ = [
    "ShardRange",
    "ShardSelection",
    "encode_shard",
    "image_sizes",
    "merge_shards",
    "part_path",
    "scan_shard",
    "select_shards",
    "shard_ranges",
]


#: the codec and level of the part files: fast, since the merge compresses the frames again
PART_CODEC = "zstd"
PART_LEVEL = 1


@attrs.frozen
class ShardRange:
    """Units ``[first, end)`` of image ``image`` of the overlay."""

    image: int
    first: int
    end: int


@attrs.frozen
class ScanResult:
    """What :func:`scan_shard` found in one range."""

    range: ShardRange
    changed: np.ndarray
    #: the range's chunk digests (see :class:`_ChunkDigests`); ``None`` when hints were used
    digest_parts: bytes | None
    #: the changed units that are full and not zero, and their hashes
    units: np.ndarray
    hashes: np.ndarray


@attrs.frozen
class ShardSelection:
    """What :func:`select_shards` decided for the whole overlay."""

    kept: tuple[np.ndarray, ...]  # per shard, in shard order
    #: every kept unit's hash and packed address, in overlay order; shard ``k`` is seeded with
    #: the first ``seed_lengths[k]``
    seed_hashes: np.ndarray
    seed_addresses: np.ndarray
    seed_lengths: tuple[int, ...]
    images: tuple[dict[str, Any], ...]  # per image: changed, dropped, filters, digests


@contextlib.contextmanager
def _opened(
    config: CreateConfig, registry: Registry | None, *, indexes: bool
) -> Iterator[tuple[OverlayPlan, list[OpenedPair], list[DedupBase], list[BaseRecord]]]:
    """The plan and every pair opened, and with ``indexes`` every base's index (from the cache,
    where the batch's index tasks left it)."""
    registry = registry or default_registry()
    plan = plan_overlay(config, registry)
    with contextlib.ExitStack() as stack:
        pairs = open_pairs(plan, registry, stack, NullProgress())
        bases, records = index_bases(pairs, config.unit_size, config.cache_dir, NullProgress()) if indexes else ([], [])
        yield plan, pairs, bases, records


def image_sizes(config: CreateConfig, registry: Registry | None = None) -> list[int]:
    """The size in bytes of each modified image (a memory image's is known only once parsed)."""
    with _opened(config, registry, indexes=False) as (_, pairs, _, _):
        return [pair.modified.size for pair in pairs]


def shard_ranges(config: CreateConfig, sizes: Sequence[int], shard_size: int) -> list[ShardRange]:
    """Every image cut into ranges of about ``shard_size`` bytes, each starting on a unit and on a
    chunk of the image digest, so each range's part of the digest is its own."""
    unit = config.unit_size
    step = math.lcm(unit, ImageDigest.CHUNK)
    per_shard = max(1, round(shard_size / step)) * step // unit
    ranges = []
    for image, size in enumerate(sizes):
        count = -(-size // unit)
        ranges += [ShardRange(image, first, min(first + per_shard, count)) for first in range(0, count, per_shard)]
        if count == 0:
            ranges.append(ShardRange(image, 0, 0))
    return ranges


def part_path(output: Path, number: int) -> Path:
    """Where shard ``number`` leaves its frames: beside the overlay, which every worker writes to
    (one name per shard: a shard run again replaces its part)."""
    output = Path(output)
    return output.with_name(f".{output.name}.shard-{number}")


class _ChunkDigests(ImageDigest):
    """An :class:`ImageDigest` that keeps its chunks' digests instead of hashing them, so the
    ranges' digests join into the image's (:func:`_joined_digest`)."""

    class _Kept:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def update(self, data: bytes) -> None:
            self.parts.append(bytes(data))

    def __init__(self) -> None:
        super().__init__()
        self._outer = self._Kept()  # type: ignore[assignment]

    def parts(self) -> bytes:
        tail = self._inner.digest() if self._fill else b""
        return b"".join(self._outer.parts) + tail  # type: ignore[attr-defined]


@attrs.frozen
class _JoinedDigest:
    """The digest of a whole image from its ranges' chunk digests, as :class:`ImageDigest` makes it."""

    parts: bytes
    length: int

    def hexdigest(self) -> str:
        outer = xxhash.xxh3_128(self.parts)
        outer.update(self.length.to_bytes(8, "big"))
        return f"{ImageDigest.ALGORITHM}:{outer.hexdigest()}"


def scan_shard(config: CreateConfig, shard: ShardRange, registry: Registry | None = None) -> ScanResult:
    """Step 1: the changed units of ``shard``, its part of the digest and its changed units' hashes."""
    unit = config.unit_size
    with _opened(config, registry, indexes=False) as (_, pairs, _, _):
        pair = pairs[shard.image]
        hints = _use_hints(pair)
        digest = None if hints else _ChunkDigests()
        changed = changed_units(
            pair.base, pair.modified, unit, use_hints=hints, digest=digest, start=shard.first, stop=shard.end
        )
        units, hashes = _hashed(pair, changed, unit)
    return ScanResult(shard, changed, None if digest is None else digest.parts(), units, hashes)


def _hashed(pair: OpenedPair, indices: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """The full, non-zero units among ``indices`` and their hashes (as dedup hashes them)."""
    modified = pair.modified
    full = modified.size // unit
    indices = indices[indices < full]
    view = modified.data[: full * unit].reshape(full, unit)
    units, hashes = [], []
    for start in range(0, indices.size, BATCH_UNITS):
        batch = indices[start : start + BATCH_UNITS]
        rows = view[batch]
        nonzero = rows.view(np.uint64).any(axis=1) if unit % 8 == 0 else rows.any(axis=1)
        units.append(batch[nonzero])
        hashes.append(unit_hashes(rows[nonzero]))
        modified.release(0, modified.size)
    if not units:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    return np.concatenate(units), np.concatenate(hashes)


def select_shards(
    config: CreateConfig, scans: Sequence[ScanResult], registry: Registry | None = None
) -> ShardSelection:
    """Step 2: the filters over each image's changed units, the digests, each shard's kept units
    and the dedup seed."""
    registry = registry or default_registry()
    unit = config.unit_size
    kept_of: list[np.ndarray] = []
    seed_units: list[np.ndarray] = []
    seed_hashes: list[np.ndarray] = []
    lengths: list[int] = []
    images: list[dict[str, Any]] = []
    with _opened(config, registry, indexes=False) as (_, pairs, _, _):
        for number, pair in enumerate(pairs):
            mine = [scan for scan in scans if scan.range.image == number]
            changed = np.concatenate([scan.changed for scan in mine])
            selection = select_units(pair, changed, registry, unit)
            parts = [scan.digest_parts for scan in mine]
            running = None if any(p is None for p in parts) else _JoinedDigest(b"".join(parts), pair.modified.size)  # type: ignore[arg-type]
            digest, artifact_digest = _digests(pair, selection, running, unit, NullProgress())  # type: ignore[arg-type]
            images.append(
                {
                    "changed": int(changed.size),
                    "dropped": selection.dropped,
                    "filters": selection.filters,
                    "digest": digest,
                    "artifact_digest": artifact_digest,
                }
            )
            # the hashes of the kept units: what the scans hashed, and any unit kept unchanged
            units = np.concatenate([scan.units for scan in mine])
            hashes = np.concatenate([scan.hashes for scan in mine])
            extra_units, extra_hashes = _hashed(pair, np.setdiff1d(selection.kept, changed), unit)
            units, hashes = np.concatenate([units, extra_units]), np.concatenate([hashes, extra_hashes])
            keep = np.isin(units, selection.kept)
            units, hashes = units[keep], hashes[keep]
            order = np.argsort(units, kind="stable")
            units, hashes = units[order], hashes[order]
            before = sum(u.size for u in seed_units)
            for scan in mine:
                lo, hi = np.searchsorted(selection.kept, [scan.range.first, scan.range.end])
                kept_of.append(selection.kept[lo:hi])
                lengths.append(before + int(np.searchsorted(units, scan.range.first)))
            seed_units.append(join_addresses(number, units.astype(np.uint64) * np.uint64(unit)))
            seed_hashes.append(hashes)
    return ShardSelection(
        kept=tuple(kept_of),
        seed_hashes=np.concatenate(seed_hashes),
        seed_addresses=np.concatenate(seed_units),
        seed_lengths=tuple(lengths),
        images=tuple(images),
    )


def encode_shard(
    config: CreateConfig,
    shard: ShardRange,
    selection: ShardSelection,
    number: int,
    part: Path,
    registry: Registry | None = None,
) -> ImageStatistics:
    """Step 3: dedup and encode shard ``number``'s kept units into the frames of the part file
    ``part``; their counts.

    The part's frames are compressed fast (:data:`PART_LEVEL`): they only carry the items to the
    merge, which frames them again as one process would."""
    registry = registry or default_registry()
    unit = config.unit_size
    seed = selection.seed_lengths[number]
    with (
        _opened(config, registry, indexes=True) as (plan, pairs, bases, _),
        ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="vmdelta") as pool,
        OutputSet([]) as outputs,
    ):
        dedup = Deduplicator(unit, bases, [pair.modified for pair in pairs])
        dedup.seed(selection.seed_hashes[:seed], selection.seed_addresses[:seed])
        pending = outputs.add(part)
        with open(pending.path, "wb") as f:
            writer = OverlayWriter(
                f,
                codec=registry.codec(PART_CODEC),
                codec_id=0,
                level=PART_LEVEL,
                frame_size=config.frame_size,
                pool=pool,
                in_flight=max(2, config.threads * 2),
            )
            units = UnitEncoder(dedup, plan.refs, writer, pool, unit)
            counts = units.write(shard.image, pairs[shard.image], selection.kept[number], lambda n: None)
            writer.finish({"shard": number})
        outputs.commit()
    return counts


def merge_shards(
    config: CreateConfig,
    shards: Sequence[ShardRange],
    selection: ShardSelection,
    counts: Sequence[ImageStatistics],
    parts: Sequence[Path],
    registry: Registry | None = None,
) -> CreateReport:
    """Step 4: the overlay, from the envelopes and the parts' items in order, framed and
    compressed as one process frames them (so the overlay is the one it makes, byte for byte);
    the parts are removed once it is in place."""
    started = time.monotonic()
    registry = registry or default_registry()
    part_codec = registry.codec(PART_CODEC)
    with (
        _opened(config, registry, indexes=True) as (plan, pairs, _, records),
        OutputSet(plan.inputs) as outputs,
        ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="vmdelta") as pool,
    ):
        pending = outputs.add(config.output)
        skeleton = _skeleton(plan, registry, pairs, records)
        with open(pending.path, "wb") as f:
            writer = _writer(f, plan, pool)
            images = []
            for number, pair in enumerate(pairs):
                envelope = _store_envelope(number, pair, writer)
                mine = [k for k, shard in enumerate(shards) if shard.image == number]
                for k in mine:
                    with OverlayReader(parts[k]) as reader:
                        for entry in reader.frames:
                            items = reader.items(entry, part_codec)
                            writer.add_items(
                                number,
                                items.offsets,
                                items.lengths,
                                items.refs,
                                items.types,
                                items.values,
                                list(items.payloads),
                            )
                outcome = selection.images[number]
                summed = _summed([counts[k] for k in mine])
                images.append(
                    _completed(skeleton.images[number], summed, outcome, envelope, pair.modified.size, config)
                )
            writer.flush()
            metadata = _metadata(skeleton, images, plan, writer)
            size = writer.finish(_checked(metadata.to_json()))
        outputs.commit()
    for part in parts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
    return _report(config, size, metadata, started)


def _summed(stats: Sequence[ImageStatistics]) -> ImageStatistics:
    """The shards' counts of one image added up."""
    uses: dict[str, list[int]] = {}
    for s in stats:
        for name, use in s.encoders.items():
            total = uses.setdefault(name, [0, 0])
            total[0] += use.units
            total[1] += use.bytes
    return ImageStatistics(
        zero=sum(s.zero for s in stats),
        base_memory=sum(s.base_memory for s in stats),
        base_disk=sum(s.base_disk for s in stats),
        earlier=sum(s.earlier for s in stats),
        encoders={name: EncoderUse(units, size) for name, (units, size) in uses.items()},
    )


def _completed(
    image: ImageRecord,
    counts: ImageStatistics,
    outcome: dict[str, Any],
    envelope: EnvelopeRecord | None,
    size: int,
    config: CreateConfig,
) -> ImageRecord:
    """``image`` with what its shards and the selection found, as one process records it."""
    return attrs.evolve(
        image,
        digest=outcome["digest"],
        statistics=attrs.evolve(
            counts,
            units=-(-size // config.unit_size),
            changed=outcome["changed"],
            dropped={f.name: f.dropped for f in outcome["filters"]},
        ),
        artifact_digest=outcome["artifact_digest"],
        envelope=envelope,
        filters=outcome["filters"],
    )
