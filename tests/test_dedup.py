"""Deduplicator.classify: zero units, base memory before base disk, earlier units of the overlay,
and refs whose addresses always hold the very bytes of the unit, whatever the hashes say."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.components import SourceImage
from vmdelta_core.create import dedup as dedup_module
from vmdelta_core.create.dedup import ENCODE, DedupBase, Deduplicator
from vmdelta_core.fileio import open_file_image
from vmdelta_core.index import BaseIndex, unit_hashes
from vmdelta_core.overlay.items import split_address
from vmdelta_core.overlay.schema import Ref

UNIT = 4096
MEM, DISK, SELF, ZEROS = int(Ref.BASE_MEM), int(Ref.BASE_DISK), int(Ref.SELF), int(Ref.ZEROS)


def random_units(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, UNIT), dtype=np.uint8)


def image(units: np.ndarray, kind: str = "disk") -> SourceImage:
    return SourceImage(kind=kind, data=np.ascontiguousarray(units).reshape(-1))  # type: ignore[arg-type]


def base(ref: int, ordinal: int, units: np.ndarray) -> DedupBase:
    img = image(units, "memory" if ref == MEM else "disk")
    return DedupBase(ref, ordinal, img, BaseIndex.build(img, UNIT))


def unit_at(img: SourceImage, offset: int) -> bytes:
    return bytes(img.data[offset : offset + UNIT])


def check_refs(dedup: Deduplicator, number: int, indices: np.ndarray, classes: np.ndarray, values: np.ndarray) -> None:
    """Every ref rebuilds exactly the unit it stands for."""
    bases = {(b.ref, b.ordinal): b.image for b in dedup.bases}
    target = dedup.images[number]
    for index, cls, value in zip(indices.tolist(), classes.tolist(), values.tolist(), strict=True):
        want = unit_at(target, index * UNIT)
        if cls == ZEROS:
            assert want == bytes(UNIT) and value == 0
        elif cls in (MEM, DISK):
            ordinal, offset = split_address(value)
            assert unit_at(bases[cls, ordinal], offset) == want
        elif cls == SELF:
            image_number, offset = split_address(value)
            assert (image_number, offset) < (number, index * UNIT), "a self ref points at an earlier unit"
            assert unit_at(dedup.images[image_number], offset) == want
        else:
            assert cls == ENCODE


def test_zero_units_are_zeros_refs_even_when_a_base_holds_zeros() -> None:
    units = random_units(1, 6)
    units[[1, 4]] = 0
    base_units = np.zeros((4, UNIT), dtype=np.uint8)
    dedup = Deduplicator(UNIT, [base(MEM, 0, base_units)], [image(units)])
    classes, values = dedup.classify(0, np.arange(6))
    assert classes.tolist() == [ENCODE, ZEROS, ENCODE, ENCODE, ZEROS, ENCODE]
    assert values.tolist() == [0] * 6


def test_an_empty_batch_gives_empty_columns() -> None:
    dedup = Deduplicator(UNIT, [], [image(random_units(2, 2))])
    classes, values = dedup.classify(0, np.zeros(0, dtype=np.int64))
    assert classes.shape == values.shape == (0,)


def test_base_memory_is_preferred_to_base_disk_whatever_the_order_given() -> None:
    shared = random_units(3, 1)[0]
    disk_units, mem_units = random_units(4, 8), random_units(5, 8)
    disk_units[2] = shared
    mem_units[6] = shared
    only_disk = disk_units[5]
    target = np.stack([only_disk, shared])
    dedup = Deduplicator(UNIT, [base(DISK, 0, disk_units), base(MEM, 0, mem_units)], [image(target)])
    classes, values = dedup.classify(0, np.arange(2))
    assert classes.tolist() == [DISK, MEM]
    assert [split_address(v) for v in values.tolist()] == [(0, 5 * UNIT), (0, 6 * UNIT)]
    check_refs(dedup, 0, np.arange(2), classes, values)


def test_base_ordinals_name_the_base_that_holds_the_unit() -> None:
    first, second = random_units(6, 4), random_units(7, 4)
    target = np.stack([second[3], first[1]])
    dedup = Deduplicator(UNIT, [base(DISK, 1, second), base(DISK, 0, first)], [image(target)])
    classes, values = dedup.classify(0, np.arange(2))
    assert classes.tolist() == [DISK, DISK]
    assert [split_address(v) for v in values.tolist()] == [(1, 3 * UNIT), (0, 1 * UNIT)]


def test_units_repeated_within_a_batch_refer_to_the_first() -> None:
    new = random_units(8, 3)
    target = np.stack([new[0], new[1], new[0], new[2], new[0], new[1]])
    dedup = Deduplicator(UNIT, [base(DISK, 0, random_units(9, 4))], [image(target)])
    classes, values = dedup.classify(0, np.arange(6))
    assert classes.tolist() == [ENCODE, ENCODE, SELF, ENCODE, SELF, SELF]
    assert [split_address(v) for v in values[[2, 4, 5]].tolist()] == [(0, 0), (0, 0), (0, UNIT)]
    check_refs(dedup, 0, np.arange(6), classes, values)


def test_later_batches_and_later_images_refer_to_units_encoded_before() -> None:
    new = random_units(10, 3)
    first = np.stack([new[0], new[1], new[2], new[0]])
    second = np.stack([new[2], random_units(11, 1)[0]])
    dedup = Deduplicator(UNIT, [], [image(first), image(second)])
    c1, _ = dedup.classify(0, np.arange(2))
    c2, v2 = dedup.classify(0, np.arange(2, 4))
    c3, v3 = dedup.classify(1, np.arange(2))
    assert c1.tolist() == [ENCODE, ENCODE]
    assert c2.tolist() == [ENCODE, SELF] and split_address(int(v2[1])) == (0, 0)
    assert c3.tolist() == [SELF, ENCODE] and split_address(int(v3[0])) == (0, 2 * UNIT)
    check_refs(dedup, 0, np.arange(2, 4), c2, v2)
    check_refs(dedup, 1, np.arange(2), c3, v3)


def test_many_batches_still_find_the_first_encoded_copy() -> None:
    # more batches than the deduplicator keeps as separate sorted runs
    new = random_units(12, 40)
    dedup = Deduplicator(UNIT, [], [image(np.concatenate([new, new]))])
    for k in range(40):
        classes, _ = dedup.classify(0, np.array([k]))
        assert classes.tolist() == [ENCODE]
    classes, values = dedup.classify(0, np.arange(40, 80))
    assert (classes == SELF).all()
    assert [split_address(v)[1] for v in values.tolist()] == [k * UNIT for k in range(40)]


def test_batches_probed_ahead_resolve_as_classified_in_turn() -> None:
    """create probes the next batch (zero and base units) before this one's earlier-unit
    references are resolved: the classes and refs are those of classifying batch after batch."""
    pool = random_units(13, 6)
    base_units = np.concatenate([random_units(14, 3), pool[:2]])
    first = np.stack([pool[2], pool[0], np.zeros(UNIT, np.uint8), pool[3], pool[2], pool[4]])
    second = np.stack([pool[3], pool[1], pool[5], pool[4], pool[5]])

    def fresh() -> Deduplicator:
        return Deduplicator(UNIT, [base(DISK, 0, base_units)], [image(first), image(second)])

    batches = [(0, np.arange(0, 3)), (0, np.arange(3, 6)), (1, np.arange(0, 2)), (1, np.arange(2, 5))]
    in_turn = fresh()
    expected = [in_turn.classify(number, indices) for number, indices in batches]
    ahead = fresh()
    probes = [ahead.probe(number, indices) for number, indices in batches]  # all before any resolve
    got = [ahead.resolve(probe) for probe in probes]
    for (number, indices), (classes, values), (want_classes, want_values) in zip(batches, got, expected, strict=True):
        assert classes.tolist() == want_classes.tolist() and values.tolist() == want_values.tolist()
        check_refs(ahead, number, indices, classes, values)
    assert {int(c) for classes, _ in got for c in classes} == {ENCODE, ZEROS, DISK, SELF}


def test_a_forged_base_index_match_is_encoded_not_referenced() -> None:
    target = random_units(13, 2)
    base_units = random_units(14, 4)
    img = image(base_units)
    # an index claiming base unit 3 has the same hash as target unit 0: a collision
    forged = BaseIndex(
        size=img.size, unit_size=UNIT, fingerprint="forged", units=np.array([3]), hashes=unit_hashes(target[:1])
    )
    dedup = Deduplicator(UNIT, [DedupBase(MEM, 0, img, forged)], [image(target)])
    classes, _ = dedup.classify(0, np.arange(2))
    assert classes.tolist() == [ENCODE, ENCODE]


def test_when_every_hash_collides_no_ref_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    def colliding(units: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.full(rows.size, 7, dtype=np.uint64)

    monkeypatch.setattr(dedup_module, "unit_hashes", colliding)
    base_units = random_units(15, 4)
    img = image(base_units, "memory")
    index = BaseIndex(
        size=img.size, unit_size=UNIT, fingerprint="f", units=np.arange(4), hashes=np.full(4, 7, dtype=np.uint64)
    )
    new = random_units(16, 3)
    first = np.stack([new[0], new[1], new[0], base_units[2], new[2]])
    second = np.stack([new[1], new[2], base_units[0]])
    dedup = Deduplicator(UNIT, [DedupBase(MEM, 0, img, index)], [image(first), image(second)])
    for number, n in ((0, 5), (1, 3)):
        indices = np.arange(n)
        classes, values = dedup.classify(number, indices)
        check_refs(dedup, number, indices, classes, values)
    # the same units without collisions are still found (here: new[0] repeated in one batch)
    dedup = Deduplicator(UNIT, [DedupBase(MEM, 0, img, index)], [image(first)])
    classes, _ = dedup.classify(0, np.arange(5))
    assert classes[0] == ENCODE and classes[2] == SELF


# --------------------------------------------------------------------------------------------
# the real captures
# --------------------------------------------------------------------------------------------


def digests(units: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(row, digest_size=16).digest() for row in units]


def units_of(img: SourceImage) -> np.ndarray:
    full = img.size // UNIT
    return img.data[: full * UNIT].reshape(full, UNIT)


def test_real_captures_every_ref_is_exact_and_every_copy_is_found(realistic: Path) -> None:
    ram = realistic / "variants" / "qemu-7.2-ignore-shared"
    pairs = [
        (open_file_image(ram / "base-ram.raw", "memory"), open_file_image(ram / "modified-ram.raw", "memory")),
        (open_file_image(realistic / "base.img", "disk"), open_file_image(realistic / "modified.img", "disk")),
    ]
    bases = [
        DedupBase(MEM, 0, pairs[0][0], BaseIndex.build(pairs[0][0], UNIT)),
        DedupBase(DISK, 0, pairs[1][0], BaseIndex.build(pairs[1][0], UNIT)),
    ]
    # disk given first: memory must still be preferred
    dedup = Deduplicator(UNIT, bases[::-1], [modified for _, modified in pairs])
    in_base = [set(digests(units_of(b))) for b, _ in pairs]
    encoded: set[bytes] = set()
    seen: dict[int, int] = {}
    for number, (b, m) in enumerate(pairs):
        changed = np.flatnonzero((units_of(b) != units_of(m)).any(axis=1))
        for start in range(0, changed.size, 1000):
            batch = changed[start : start + 1000]
            classes, values = dedup.classify(number, batch)
            check_refs(dedup, number, batch, classes, values)
            for cls, digest in zip(classes.tolist(), digests(units_of(m)[batch]), strict=True):
                seen[cls] = seen.get(cls, 0) + 1
                if cls == ENCODE:  # nothing the overlay could have referred to
                    assert digest not in in_base[0] and digest not in in_base[1] and digest not in encoded
                    encoded.add(digest)
                elif cls == DISK:  # memory first
                    assert digest not in in_base[0]
    assert set(seen) == {ENCODE, ZEROS, MEM, DISK, SELF}, seen
