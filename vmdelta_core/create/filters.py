"""The filter stage: changed units the guest does not use are dropped, each with its reason.

A dropped unit is rebuilt from the base at apply time; the overlay records which filter dropped
how many, so ``apply`` can report it and ``--strict`` can refuse a lossy overlay.
"""

from __future__ import annotations

import attrs
import numpy as np

from vmdelta_core.components import FilterContext, FilterResult
from vmdelta_core.config import recorded_name
from vmdelta_core.create.sources import OpenedPair
from vmdelta_core.errors import PluginError
from vmdelta_core.overlay.digest import file_digest
from vmdelta_core.overlay.metadata import MAX_FILTER_RUNS, FilterRecord
from vmdelta_core.registry import Registry

__all__ = ["Selection", "select_units"]


@attrs.frozen
class Selection:
    """What the filters left of the changed units: ``kept`` to encode, ``dropped`` to rebuild from
    the base (both sorted unit indices), and what each filter did."""

    kept: np.ndarray
    dropped: np.ndarray
    filters: tuple[FilterRecord, ...]


def select_units(pair: OpenedPair, changed: np.ndarray, registry: Registry, unit: int) -> Selection:
    """Run the image's filters in order over ``changed``, each seeing what the ones before kept."""
    spec = pair.plan.spec
    records: list[FilterRecord] = []
    dropped_by: list[np.ndarray] = []
    kept = changed
    for f in spec.filters:
        context = FilterContext(pair.plan.name, spec.kind, unit, pair.base, pair.modified, f.input, dict(f.options))
        result = registry.filter(f.name).select(context, kept.copy())
        drop = _checked_mask(f.name, result, kept)
        dropped_by.append(kept[drop])
        records.append(
            FilterRecord(
                name=f.name,
                reason=result.reason,
                dropped=int(drop.sum()),
                input=recorded_name(f.input) if f.input else None,
                input_fingerprint=file_digest(f.input) if f.input else None,
                details=result.details,
            )
        )
        kept = kept[~drop]
    dropped = np.sort(np.concatenate(dropped_by)) if dropped_by else np.zeros(0, dtype=np.int64)

    last = -(-pair.modified.size // unit) - 1
    if pair.modified.size > pair.base.size and (not kept.size or kept[-1] != last):
        # an image larger than its base carries its last unit, zero or not (a filter may not drop
        # it): apply believes a size past the base only as far as the items reach
        kept = np.append(kept, np.int64(last))
        records = [
            attrs.evolve(record, dropped=record.dropped - 1) if last in gone else record
            for record, gone in zip(records, dropped_by, strict=True)
        ]
        dropped = dropped[dropped != last]
        dropped_by = [gone[gone != last] for gone in dropped_by]
    records = [attrs.evolve(record, runs=unit_runs(gone)) for record, gone in zip(records, dropped_by, strict=True)]
    return Selection(kept, dropped, tuple(records))


def unit_runs(units: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Sorted unit indices as ``(first, count)`` runs, or ``None`` when there are more runs than
    a filter record lists (the overlay then says how many units, not where)."""
    units = np.sort(units)
    if not units.size:
        return ()
    breaks = np.flatnonzero(np.diff(units) != 1) + 1
    if breaks.size + 1 > MAX_FILTER_RUNS:
        return None
    starts = units[np.concatenate(([0], breaks))]
    counts = np.diff(np.concatenate(([0], breaks, [units.size])))
    return tuple(zip(starts.tolist(), counts.tolist(), strict=True))


def _checked_mask(name: str, result: FilterResult, candidates: np.ndarray) -> np.ndarray:
    if not isinstance(getattr(result, "reason", None), str) or not hasattr(result, "drop"):
        raise PluginError(f"filter {name!r} answered with {type(result).__name__}, not a FilterResult")
    drop = np.asarray(result.drop)
    if drop.dtype != np.bool_ or drop.shape != candidates.shape:
        raise PluginError(
            f"filter {name!r} answered with a mask of {drop.dtype} {drop.shape} for {candidates.shape[0]} candidates"
        )
    return drop
