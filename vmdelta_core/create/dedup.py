"""Dedup of changed units: zero, then base memory, then base disk, then earlier in this overlay.

Everything runs on arrays of one batch of units: hashes are looked up with ``np.searchsorted``
in the base indexes, and every proposed match is confirmed by comparing the bytes (vectorized)
before a ref is emitted, so a hash collision can only cost a missed match, never a wrong VM.

Refs carry addresses packed as :func:`vmdelta_core.overlay.items.join_addresses` packs them.
"""

from __future__ import annotations

import attrs
import numpy as np

from vmdelta_core.components import SourceImage
from vmdelta_core.index import BaseIndex, unit_hashes
from vmdelta_core.overlay.items import ADDRESS_BITS, OFFSET_MASK, join_addresses
from vmdelta_core.overlay.schema import Ref

__all__ = ["ENCODE", "DedupBase", "Deduplicator", "Probe"]

ENCODE = 0  # class of a unit that needs an encoder


def _rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ~(a.view(np.uint64) != b.view(np.uint64)).any(axis=1) if a.shape[1] % 8 == 0 else (a == b).all(axis=1)


def _take(units: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows ``rows`` of a ``(n, unit)`` array, copied out (``take`` copies each row whole,
    twice as fast as indexing, which copies byte by byte)."""
    return np.take(units, rows, axis=0)


@attrs.define(eq=False)
class DedupBase:
    """A base image units can be referenced from."""

    ref: int  # Ref.BASE_MEM or Ref.BASE_DISK
    ordinal: int
    image: SourceImage
    index: BaseIndex

    def units(self) -> np.ndarray:
        unit = self.index.unit_size
        full = self.image.size // unit
        return self.image.data[: full * unit].reshape(full, unit)


@attrs.define(eq=False)
class Probe:
    """A batch of units probed (:meth:`Deduplicator.probe`), waiting to be resolved: its units
    gathered, its classes so far, and the rows still to encode (``todo``) with their hashes."""

    image_number: int
    indices: np.ndarray
    classes: np.ndarray
    values: np.ndarray
    units: np.ndarray = attrs.field(factory=lambda: np.zeros((0, 0), dtype=np.uint8))
    todo: np.ndarray = attrs.field(factory=lambda: np.zeros(0, dtype=np.int64))
    hashes: np.ndarray = attrs.field(factory=lambda: np.zeros(0, dtype=np.uint64))


@attrs.define(eq=False)
class _Seen:
    hashes: np.ndarray
    addresses: np.ndarray


class Deduplicator:
    """Classifies batches of changed units; remembers what the overlay already holds."""

    def __init__(self, unit: int, bases: list[DedupBase], images: list[SourceImage]) -> None:
        self.unit = unit
        # order matters: all memory bases before all disk bases
        self.bases = sorted(bases, key=lambda b: (b.ref != Ref.BASE_MEM, b.ordinal))
        self.images = images
        self._seen: list[_Seen] = []

    def seed(self, hashes: np.ndarray, addresses: np.ndarray) -> None:
        """Make units of the overlay that another process encodes referable, as if this one had
        encoded them: ``hashes`` of units at ``addresses`` (packed), given in overlay order.

        Among equal hashes the earliest address is found first (the sort is stable), which is
        the unit a single process would have encoded and referenced; units there that are zero
        or in a base are never looked up, since those classes are tried before this one.
        """
        if hashes.size:
            order = np.argsort(hashes, kind="stable")
            self._seen = [_Seen(hashes[order], addresses[order])]

    def classify(self, image_number: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classes (``ENCODE`` or a Ref) and ref values for the units ``indices`` of one image.

        The units must be full units inside the image; they are given in address order, and
        every batch of an image must come after the batches before it.
        """
        return self.resolve(self.probe(image_number, indices))

    def probe(self, image_number: int, indices: np.ndarray) -> Probe:
        """The first half of :meth:`classify`: zero units and units in a base. It reads only what
        does not change (the images, the bases and their indexes), so batches may be probed
        ahead, on another thread, while earlier ones are resolved."""
        unit = self.unit
        image = self.images[image_number]
        n = indices.shape[0]
        probe = Probe(image_number, indices, np.full(n, ENCODE, dtype=np.uint8), np.zeros(n, dtype=np.uint64))
        if n == 0:
            return probe
        full = image.size // unit
        probe.units = units = _take(image.data[: full * unit].reshape(full, unit), indices)
        nonzero = units.view(np.uint64).any(axis=1) if unit % 8 == 0 else units.any(axis=1)
        probe.classes[~nonzero] = Ref.ZEROS
        todo = np.flatnonzero(nonzero)
        hashes = unit_hashes(units, todo)
        for base in self.bases:
            if todo.size == 0:
                break
            found = base.index.lookup(hashes)
            hit = np.flatnonzero(found >= 0)
            if hit.size == 0:
                continue
            same = _rows_equal(_take(units, todo[hit]), _take(base.units(), found[hit]))
            rows = todo[hit[same]]
            probe.classes[rows] = base.ref
            probe.values[rows] = join_addresses(base.ordinal, found[hit[same]].astype(np.uint64) * np.uint64(unit))
            keep = np.ones(todo.size, dtype=bool)
            keep[hit[same]] = False
            todo, hashes = todo[keep], hashes[keep]
        probe.todo, probe.hashes = todo, hashes
        return probe

    def resolve(self, probe: Probe) -> tuple[np.ndarray, np.ndarray]:
        """The second half of :meth:`classify`: units equal to one encoded earlier in this
        overlay. Batches are resolved in order, each after those before it."""
        classes, values, todo, hashes = probe.classes, probe.values, probe.todo, probe.hashes
        if todo.size:
            todo, hashes = self._earlier_batches(todo, hashes, probe.units, classes, values)
        if todo.size:
            self._within_batch(probe.image_number, probe.indices, todo, hashes, probe.units, classes, values)
        return classes, values

    def _earlier_batches(
        self, todo: np.ndarray, hashes: np.ndarray, units: np.ndarray, classes: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        unit = self.unit
        keep = np.ones(todo.size, dtype=bool)
        for seen in self._seen:
            pos = np.minimum(np.searchsorted(seen.hashes, hashes), seen.hashes.size - 1)
            hit = np.flatnonzero(keep & (seen.hashes[pos] == hashes))
            if not hit.size:
                continue
            addresses = seen.addresses[pos[hit]]
            numbers = addresses >> np.uint64(ADDRESS_BITS)
            for number in np.unique(numbers).tolist():
                mine = np.flatnonzero(numbers == number)
                image = self.images[number]
                offsets = (addresses[mine] & np.uint64(OFFSET_MASK)).astype(np.int64)
                # an earlier unit is a whole one (only those are remembered); anything else is no match
                inside = (offsets % unit == 0) & (offsets + unit <= image.size)
                mine, offsets = mine[inside], offsets[inside]
                full = image.size // unit
                earlier = _take(image.data[: full * unit].reshape(full, unit), offsets // unit)
                same = mine[_rows_equal(_take(units, todo[hit[mine]]), earlier)]
                rows = todo[hit[same]]
                classes[rows] = Ref.SELF
                values[rows] = addresses[same]
                keep[hit[same]] = False
        return todo[keep], hashes[keep]

    def _within_batch(
        self,
        image_number: int,
        indices: np.ndarray,
        todo: np.ndarray,
        hashes: np.ndarray,
        units: np.ndarray,
        classes: np.ndarray,
        values: np.ndarray,
    ) -> None:
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        leader = first[inverse]  # position in todo of the first unit with the same hash
        later = np.flatnonzero(leader != np.arange(todo.size))
        if later.size:
            same = _rows_equal(_take(units, todo[later]), _take(units, todo[leader[later]]))
            rows = todo[later[same]]
            classes[rows] = Ref.SELF
            lead_units = indices[todo[leader[later[same]]]].astype(np.uint64)
            values[rows] = join_addresses(image_number, lead_units * np.uint64(self.unit))
        # what is encoded in this batch can be referenced by later ones
        encoded = classes[todo] == ENCODE
        if encoded.any():
            h = hashes[encoded]
            addresses = join_addresses(image_number, indices[todo[encoded]].astype(np.uint64) * np.uint64(self.unit))
            self._remember(h, addresses)

    def _remember(self, hashes: np.ndarray, addresses: np.ndarray) -> None:
        self._seen.append(_Seen(hashes, addresses))
        if len(self._seen) == 1 or len(self._seen) > 8:
            # keep few sorted runs, so lookups stay a handful of searchsorted calls
            h = np.concatenate([s.hashes for s in self._seen])
            a = np.concatenate([s.addresses for s in self._seen])
            order = np.argsort(h, kind="stable")
            self._seen = [_Seen(h[order], a[order])]
        else:
            order = np.argsort(hashes, kind="stable")
            self._seen[-1] = _Seen(hashes[order], addresses[order])
