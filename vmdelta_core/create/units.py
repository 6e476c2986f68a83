"""The dedup and encode stages: the kept units of one image become items of the overlay.

Units go in batches of :data:`BATCH_UNITS`: dedup classifies a batch with arrays, the encoders
take what is left on the thread pool, and the batch's items go to the writer, which frames and
compresses them. Three batches are under way at once: the pool encodes one, this thread resolves
the next one's references to earlier units, and a thread of its own probes the one after for
zero units and units in a base. Memory stays bounded by those three batches, not the image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import attrs
import numpy as np

from vmdelta_core.components import SourceImage
from vmdelta_core.create.dedup import ENCODE, Deduplicator, Probe
from vmdelta_core.create.encode import EncoderChoice, EncodingPolicy
from vmdelta_core.create.plan import ImagePlan
from vmdelta_core.create.sources import OpenedPair
from vmdelta_core.overlay.container import OverlayWriter
from vmdelta_core.overlay.metadata import EncoderUse, ImageStatistics
from vmdelta_core.overlay.schema import ITEM_TYPES, Ref

__all__ = ["BATCH_UNITS", "UnitEncoder"]

BATCH_UNITS = 2048

#: the statistics counter of each reference class
_COUNTED = {
    int(Ref.ZEROS): "zero",
    int(Ref.BASE_MEM): "base_memory",
    int(Ref.BASE_DISK): "base_disk",
    int(Ref.SELF): "earlier",
}


@attrs.define
class _Batch:
    """A batch classified, its encoding under way: :meth:`finish` waits for it."""

    units: np.ndarray
    classes: np.ndarray
    values: np.ndarray
    todo: np.ndarray
    encoded: Callable[[], tuple[list[int], list[bytes]]] | None

    def finish(self) -> tuple[np.ndarray, list[bytes | None]]:
        """Refs and payloads of every unit of the batch."""
        refs = self.classes.astype(np.uint8)
        payloads: list[bytes | None] = [None] * self.units.size
        if self.encoded is not None:
            encoded_refs, encoded = self.encoded()
            refs[self.todo] = encoded_refs
            for row, payload in zip(self.todo.tolist(), encoded, strict=True):
                payloads[row] = payload
        return refs, payloads


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
        """Write items for the units ``kept`` (sorted indices) of image ``number``; its counts.

        Batches overlap three deep: while the pool encodes a batch, this thread resolves the
        next one's references to earlier units, and a thread of its own probes the one after
        (zero units, units in a base: reading pages of the bases is most of dedup's time).
        """
        plan: ImagePlan = pair.plan
        policy = EncodingPolicy([self.refs[name] for name in plan.encoders], self.refs["raw"], plan.policy, self.pool)
        counts = dict.fromkeys(_COUNTED.values(), 0)
        uses: dict[str, list[int]] = {}
        item_type = int(ITEM_TYPES[plan.spec.kind][0])
        full = pair.modified.size // self.unit
        batches = [kept[start : start + BATCH_UNITS] for start in range(0, kept.size, BATCH_UNITS)]
        pending: _Batch | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmdelta-probe") as ahead:

            def probe(k: int) -> Future[Probe] | None:
                if k == len(batches):
                    return None
                return ahead.submit(self.dedup.probe, number, batches[k][batches[k] < full])

            following = probe(0)
            try:
                for k in range(len(batches) + 1):
                    started = None
                    if following is not None:
                        probed = following.result()
                        following = probe(k + 1)  # only the next one: each holds its batch's units
                        started = self._start(pair, batches[k], probed, policy)
                    if pending is not None:
                        refs, payloads = pending.finish()
                        _count(counts, uses, self._names, pending.classes, refs, payloads)
                        self.writer.add_items(
                            number,
                            (pending.units * self.unit).astype(np.uint64),
                            np.minimum(self.unit, pair.modified.size - pending.units * self.unit),
                            refs,
                            np.full(pending.units.size, item_type, dtype=np.uint8),
                            pending.values,
                            payloads,
                        )
                        advance(int(pending.units.size) * self.unit)
                        self._release(number, (int(pending.units[-1]) + 1) * self.unit)
                    pending = started
            finally:
                if following is not None:
                    following.cancel()
        return ImageStatistics(
            encoders={name: EncoderUse(units, size) for name, (units, size) in uses.items()}, **counts
        )

    def _start(self, pair: OpenedPair, batch: np.ndarray, probe: Probe, policy: EncodingPolicy) -> _Batch:
        """Resolve one probed batch of units (a ref, or ENCODE) and start encoding what is left."""
        unit, modified = self.unit, pair.modified
        full = modified.size // unit
        classes, values = self.dedup.resolve(probe)
        if probe.indices.size < batch.size:  # the short last unit: zero or encoded, never deduplicated
            tail_zero = not modified.data[full * unit :].any()
            classes = np.append(classes, np.uint8(Ref.ZEROS if tail_zero else ENCODE))
            values = np.append(values, np.uint64(0))
        todo = np.flatnonzero(classes == ENCODE)
        encoded = None
        if todo.size:
            rows = batch[todo]
            lengths = np.minimum(unit, modified.size - rows * unit)
            view = memoryview(modified.data)
            targets = [view[s : s + n] for s, n in zip((rows * unit).tolist(), lengths.tolist(), strict=True)]
            encoded = policy.submit(_bases_of(pair.base, rows, lengths, unit), targets)
        return _Batch(batch, classes, values, todo, encoded)

    def _release(self, number: int, done: int) -> None:
        """What the batches up to byte ``done`` of image ``number`` read (their units, their
        bases, dedup confirmations anywhere in the bases and earlier images) is done with: drop
        those pages. The image's pages past ``done`` stay: the batch in flight reads them."""
        for at, image in enumerate(self.dedup.images):
            image.release(0, done if at == number else image.size)
        for base in self.dedup.bases:
            base.image.release(0, base.image.size)


def _bases_of(base: SourceImage, rows: np.ndarray, lengths: np.ndarray, unit: int) -> list[memoryview]:
    """The base's bytes of each unit ``rows`` (``lengths`` long), zero-padded past its end:
    gathered in one copy where the units lie whole inside the base."""
    full = base.size // unit
    whole = (rows < full) & (lengths == unit)
    gathered = memoryview(np.take(base.data[: full * unit].reshape(full, unit), rows[whole], axis=0).reshape(-1))
    out: list[memoryview] = []
    at = 0
    for row, length, inside in zip(rows.tolist(), lengths.tolist(), whole.tolist(), strict=True):
        if inside:
            out.append(gathered[at : at + unit])
            at += unit
        else:
            out.append(memoryview(base.padded(row * unit, length)))
    return out


def _count(
    counts: dict[str, int],
    uses: dict[str, list[int]],
    names: Mapping[int, str],
    classes: np.ndarray,
    refs: np.ndarray,
    payloads: list[bytes | None],
) -> None:
    """Add a batch to the image's counts of each reference class and each encoder's use."""
    for ref, name in _COUNTED.items():
        counts[name] += int((classes == ref).sum())
    for ref, payload in zip(refs.tolist(), payloads, strict=True):
        if payload is not None:
            use = uses.setdefault(names[ref], [0, 0])
            use[0] += 1
            use[1] += len(payload)
