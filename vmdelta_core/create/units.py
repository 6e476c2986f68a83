"""The dedup and encode stages: the kept units of one image become items of the overlay.

Units go in batches of :data:`BATCH_UNITS`: dedup classifies a batch with arrays, the encoders
take what is left on the thread pool, and the batch's items go to the writer, which frames and
compresses them. Memory stays bounded by the batch, not the image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vmdelta_core.create.dedup import ENCODE, Deduplicator
from vmdelta_core.create.encode import EncoderChoice, EncodingPolicy
from vmdelta_core.create.plan import ImagePlan
from vmdelta_core.create.sources import OpenedPair
from vmdelta_core.overlay.container import OverlayWriter
from vmdelta_core.overlay.metadata import EncoderUse, ImageStatistics
from vmdelta_core.overlay.schema import ITEM_TYPES, Ref

__all__ = ["BATCH_UNITS", "UnitEncoder"]

BATCH_UNITS = 4096

#: the statistics counter of each reference class
_COUNTED = {
    int(Ref.ZEROS): "zero",
    int(Ref.BASE_MEM): "base_memory",
    int(Ref.BASE_DISK): "base_disk",
    int(Ref.SELF): "earlier",
}


class UnitEncoder:
    """Dedups and encodes the units of the images of one overlay, writing their items."""

    def __init__(
        self,
        dedup: Deduplicator,
        refs: Mapping[str, EncoderChoice],
        writer: OverlayWriter,
        pool: ThreadPoolExecutor,
        unit: int,
    ) -> None:
        self.dedup = dedup
        self.refs = refs
        self.writer = writer
        self.pool = pool
        self.unit = unit
        self._names = {choice.ref: choice.name for choice in refs.values()}

    def write(self, number: int, pair: OpenedPair, kept: np.ndarray, advance: Callable[[int], None]) -> ImageStatistics:
        """Write items for the units ``kept`` (sorted indices) of image ``number``; its counts."""
        plan: ImagePlan = pair.plan
        policy = EncodingPolicy([self.refs[name] for name in plan.encoders], self.refs["raw"], plan.policy, self.pool)
        counts = dict.fromkeys(_COUNTED.values(), 0)
        uses: dict[str, list[int]] = {}
        for start in range(0, kept.size, BATCH_UNITS):
            batch = kept[start : start + BATCH_UNITS]
            classes, values, refs, payloads = self._batch(number, pair, batch, policy)
            for ref, name in _COUNTED.items():
                counts[name] += int((classes == ref).sum())
            for ref, payload in ((int(r), p) for r, p in zip(refs.tolist(), payloads, strict=True) if p is not None):
                use = uses.setdefault(self._names[ref], [0, 0])
                use[0] += 1
                use[1] += len(payload)
            lengths = np.minimum(self.unit, pair.modified.size - batch * self.unit)
            item_type = int(ITEM_TYPES[plan.spec.kind][0])
            self.writer.add_items(
                number,
                (batch * self.unit).astype(np.uint64),
                lengths,
                refs,
                np.full(batch.size, item_type, dtype=np.uint8),
                values,
                payloads,
            )
            advance(int(batch.size) * self.unit)
            self._release()
        return ImageStatistics(
            encoders={name: EncoderUse(units, size) for name, (units, size) in uses.items()}, **counts
        )

    def _batch(
        self, number: int, pair: OpenedPair, batch: np.ndarray, policy: EncodingPolicy
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[bytes | None]]:
        """Classes (a ref, or ENCODE), ref values, refs and payloads of one batch of units."""
        unit, modified = self.unit, pair.modified
        full = modified.size // unit
        whole = batch[batch < full]
        classes, values = self.dedup.classify(number, whole)
        if whole.size < batch.size:  # the short last unit: zero or encoded, never deduplicated
            tail_zero = not modified.data[full * unit :].any()
            classes = np.append(classes, np.uint8(Ref.ZEROS if tail_zero else ENCODE))
            values = np.append(values, np.uint64(0))
        refs = classes.astype(np.uint8)
        payloads: list[bytes | None] = [None] * batch.size
        todo = np.flatnonzero(classes == ENCODE)
        if todo.size:
            starts = (batch[todo] * unit).tolist()
            lengths = np.minimum(unit, modified.size - batch[todo] * unit).tolist()
            bases = [memoryview(pair.base.padded(s, n)) for s, n in zip(starts, lengths, strict=True)]
            targets = [memoryview(modified.data[s : s + n]) for s, n in zip(starts, lengths, strict=True)]
            encoded_refs, encoded = policy.encode(bases, targets)
            refs[todo] = encoded_refs
            for row, payload in zip(todo.tolist(), encoded, strict=True):
                payloads[row] = payload
        return classes, values, refs, payloads

    def _release(self) -> None:
        """What a batch read (its units, their bases, dedup confirmations anywhere in the bases
        and earlier images) is done with: drop those pages."""
        for image in self.dedup.images:
            image.release(0, image.size)
        for base in self.dedup.bases:
            base.image.release(0, base.image.size)
