"""Opening the artifacts: every image pair through its sources, and every base's index.

Parsing an artifact is mostly I/O and numpy, so all of them open at once on a few threads.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs

from vmdelta_core.baseimage import open_base_image
from vmdelta_core.components import SourceImage
from vmdelta_core.config import recorded_name
from vmdelta_core.create.dedup import DedupBase
from vmdelta_core.create.plan import ImagePlan, OverlayPlan
from vmdelta_core.index import load_or_build_index
from vmdelta_core.overlay.metadata import BaseRecord
from vmdelta_core.overlay.schema import BASE_REFS
from vmdelta_core.records import Progress
from vmdelta_core.registry import Registry

__all__ = ["OpenedPair", "index_bases", "open_pairs"]


@attrs.define(eq=False)
class OpenedPair:
    """One image pair, opened: what the later stages read."""

    plan: ImagePlan
    base: SourceImage
    modified: SourceImage


def open_pairs(
    plan: OverlayPlan, registry: Registry, stack: contextlib.ExitStack, progress: Progress
) -> list[OpenedPair]:
    """Open every base and modified artifact; whatever opened is closed by ``stack``, even when
    another open fails."""
    jobs: list[tuple[Callable[[], SourceImage], Path]] = []
    for image in plan.images:
        spec = image.spec
        base = functools.partial(
            open_base_image,
            registry.source(image.base_source),
            image.base_source,
            spec.base,
            kind=spec.kind,
            options=spec.open_options("base"),
            cache_dir=plan.config.cache_dir,
        )
        modified = functools.partial(
            registry.source(image.source).open, spec.modified, kind=spec.kind, options=spec.open_options("modified")
        )
        jobs += [(base, spec.base), (modified, spec.modified)]
    advance = progress.start("open artifacts", sum(path.stat().st_size for _, path in jobs))
    images = _open_all(jobs, plan.config.threads, stack, advance)
    return [OpenedPair(image, images[2 * k], images[2 * k + 1]) for k, image in enumerate(plan.images)]


def _open_all(
    jobs: list[tuple[Callable[[], SourceImage], Path]],
    threads: int,
    stack: contextlib.ExitStack,
    advance: Callable[[int], None],
) -> list[SourceImage]:
    """Each job's image (a base from its kept image where there is one), opened on ``threads``."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
        futures = [pool.submit(job) for job, _ in jobs]
        first_error: BaseException | None = None
        images = []
        for future, (_, path) in zip(futures, jobs, strict=True):
            try:
                images.append(stack.enter_context(future.result()))
                advance(path.stat().st_size)
            except BaseException as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
    return images


def index_bases(
    pairs: list[OpenedPair], unit: int, cache_dir: Path | None, progress: Progress
) -> tuple[list[DedupBase], list[BaseRecord]]:
    """Each base's index (built once, then cached), as dedup reads it and as the overlay records it."""
    bases: list[DedupBase] = []
    records: list[BaseRecord] = []
    ordinals = {"memory": 0, "disk": 0}
    for pair in pairs:
        spec = pair.plan.spec
        advance = progress.start(f"index {spec.base.name}", pair.base.size)
        index, cached = load_or_build_index(
            spec.base,
            pair.base,
            source=pair.plan.base_source,
            unit=unit,
            options=spec.open_options("base"),
            cache_dir=cache_dir,
            progress=advance,
        )
        if cached:
            advance(pair.base.size)
        bases.append(DedupBase(int(BASE_REFS[spec.kind]), ordinals[spec.kind], pair.base, index))
        ordinals[spec.kind] += 1
        records.append(BaseRecord(recorded_name(spec.base), pair.plan.base_source, pair.base.size, index.fingerprint))
    return bases, records
