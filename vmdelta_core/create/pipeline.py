"""``create``: the stages in order, from a config to the overlay file.

plan (:mod:`.plan`) -> open artifacts and index bases (:mod:`.sources`) -> per image: detect
changes (:mod:`.changes`), filter (:mod:`.filters`), dedup and encode (:mod:`.units`), store the
envelope, take the digest -> metadata -> the overlay appears (:mod:`vmdelta_core.outputs`).
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import numpy as np

from vmdelta_core.components import SourceImage
from vmdelta_core.config import CreateConfig, describe_config, recorded_name
from vmdelta_core.create.changes import changed_units
from vmdelta_core.create.dedup import Deduplicator
from vmdelta_core.create.filters import Selection, select_units
from vmdelta_core.create.plan import OverlayPlan, plan_overlay
from vmdelta_core.create.prefix import FramePrefixes
from vmdelta_core.create.sources import OpenedPair, index_bases, open_pairs
from vmdelta_core.create.units import UnitEncoder
from vmdelta_core.errors import PluginError
from vmdelta_core.index import image_digest
from vmdelta_core.jsonvalue import find_problem, path_text
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.container import OverlayWriter
from vmdelta_core.overlay.digest import ImageDigest, file_digest
from vmdelta_core.overlay.envelope import compress_envelope
from vmdelta_core.overlay.metadata import (
    BaseRecord,
    ComponentRecord,
    EnvelopeRecord,
    ImageRecord,
    ImageStatistics,
    OverlayMetadata,
)
from vmdelta_core.overlay.parts import split_document
from vmdelta_core.plugins import core_version
from vmdelta_core.records import CreateReport, ImageReport, NullProgress, Progress
from vmdelta_core.registry import ComponentInfo, Registry, default_registry

__all__ = ["create_overlay"]

#: frames in flight to the compression pool, whatever the thread count and frame size
_IN_FLIGHT_BYTES = 512 << 20


def create_overlay(
    config: CreateConfig,
    *,
    registry: Registry | None = None,
    progress: Progress | None = None,
    stream: BinaryIO | None = None,
) -> CreateReport:
    """Create the overlay ``config.output`` from the image pairs of ``config``.

    The output appears only when everything succeeded; an existing file of that name is replaced
    then and not before.

    :param stream: write the overlay to this file object instead (standard output, a socket), in
        the stream form, frame by frame as they are made; ``config.output`` then only names it.
        A failure leaves it cut short, which every reader refuses.
    """
    started = time.monotonic()
    registry = registry or default_registry()
    progress = progress or NullProgress()
    plan = plan_overlay(config, registry)
    with contextlib.ExitStack() as stack:
        # the output is checked, and its file made, before anything is read
        outputs = stack.enter_context(OutputSet(plan.inputs))
        pending = None if stream is not None else outputs.add(config.output)
        pairs = open_pairs(plan, registry, stack, progress)
        bases, base_records = index_bases(pairs, config.unit_size, config.cache_dir, progress)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="vmdelta"))
        dedup = Deduplicator(config.unit_size, bases, [pair.modified for pair in pairs])
        skeleton = _skeleton(plan, registry, pairs, base_records)
        try:
            if stream is not None:
                size, metadata = _write_overlay(stream, True, plan, skeleton, pairs, dedup, pool, registry, progress)
            else:
                assert pending is not None
                with open(pending.path, "wb") as f:
                    size, metadata = _write_overlay(f, False, plan, skeleton, pairs, dedup, pool, registry, progress)
        except OSError as exc:
            raise outputs.explain(exc, config.output) from None
        outputs.commit()
    return _report(config, size, metadata, started)


def _report(config: CreateConfig, size: int, metadata: OverlayMetadata, started: float) -> CreateReport:
    """What ``create`` tells of the overlay it wrote, begun at ``started`` (``time.monotonic``)."""
    return CreateReport(
        output=config.output,
        size=size,
        seconds=time.monotonic() - started,
        images=tuple(ImageReport.from_record(image) for image in metadata.images),
        metadata=metadata,
    )


def _write_overlay(
    file: BinaryIO,
    stream_form: bool,
    plan: OverlayPlan,
    skeleton: OverlayMetadata,
    pairs: list[OpenedPair],
    dedup: Deduplicator,
    pool: ThreadPoolExecutor,
    registry: Registry,
    progress: Progress,
) -> tuple[int, OverlayMetadata]:
    """Encode every image into ``file``: the overlay's size and metadata."""
    config = plan.config
    writer = _writer(file, plan, pool, stream=stream_form, bases=[pair.base for pair in pairs])
    writer.begin(split_document(_checked(skeleton.to_json()))[0])
    units = UnitEncoder(dedup, plan.refs, writer, pool, config.unit_size)
    # every image's changes are read ahead, in order, on a thread of their own: while the pool
    # and this thread encode one image, the next one's compare and digests are under way
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmdelta-scan")
    scans: list[tuple[Future[_Scan], _Scan]] = []
    try:
        for pair in pairs:
            state = _Scan()
            scans.append((ahead.submit(_scan, pair, config.unit_size, state), state))
        images = [
            _encode_image(number, pair, skeleton.images[number], units, registry, progress, scans[number])
            for number, pair in enumerate(pairs)
        ]
    except BaseException:
        for scan, state in scans:
            scan.cancel()
            state.stopped = True  # a scan under way stops at its next chunk
        writer.abort()
        raise
    finally:
        ahead.shutdown(wait=True)
    writer.flush()
    metadata = _metadata(skeleton, images, plan, writer)
    size = writer.finish(_checked(metadata.to_json()))
    file.flush()
    return size, metadata


def _writer(
    file: BinaryIO,
    plan: OverlayPlan,
    pool: ThreadPoolExecutor,
    *,
    stream: bool = False,
    bases: list[SourceImage] | None = None,
) -> OverlayWriter:
    """The overlay's writer: its frames compressed on ``pool``, as the config asks; a codec that
    compresses against the base (``zstd-base``) is given each image's ``bases``, indexed."""
    config = plan.config
    codec = plan.codec.component
    if bases is not None and getattr(codec, "reads_base", False):
        codec = codec.bind(FramePrefixes(bases, pool), threads=config.threads)  # type: ignore[attr-defined]
    return OverlayWriter(
        file,
        codec=codec,
        codec_id=0,
        level=config.level,
        frame_size=config.frame_size,
        pool=pool,
        # two frames a thread keeps every core busy; never more than 512 MiB of them at once
        in_flight=max(2, min(config.threads * 2, _IN_FLIGHT_BYTES // config.frame_size)),
        stream=stream,
    )


def _checked(document: dict[str, Any]) -> dict[str, Any]:
    """``document``, if it holds nothing apply would refuse (a source's layout, a filter's
    details out of bounds)."""
    problem = find_problem(document)
    if problem is not None:
        where, what = problem
        raise PluginError(f"overlay metadata: {path_text(where)} {what}; the overlay was not written")
    return document


def _skeleton(
    plan: OverlayPlan, registry: Registry, pairs: list[OpenedPair], base_records: list[BaseRecord]
) -> OverlayMetadata:
    """The metadata known before the first frame (a stream's prologue): components, settings and
    each image but its outcome (digests, statistics, filters, envelope)."""

    def component(info: ComponentInfo, **ids: int) -> ComponentRecord:
        return ComponentRecord(info.kind, info.name, info.distribution, info.version, **ids)  # type: ignore[arg-type]

    components = [component(plan.codec, id=0)]
    components += [component(registry.info("encoder", n), ref=choice.ref) for n, choice in sorted(plan.refs.items())]
    sources = sorted({s for image in plan.images for s in (image.source, image.base_source)})
    components += [component(registry.info("source", name)) for name in sources]
    filters = sorted({f.name for image in plan.images for f in image.spec.filters})
    components += [component(registry.info("filter", name)) for name in filters]
    images = [
        ImageRecord(
            name=pair.plan.name,
            kind=pair.plan.spec.kind,
            source=pair.plan.source,
            base_source=pair.plan.base_source,
            size=pair.modified.size,
            digest="",
            base=base,
            statistics=ImageStatistics(),
            artifact=recorded_name(pair.plan.spec.modified),
            layout=pair.modified.layout,
            encoders=pair.plan.encoders,
            policy=pair.plan.policy,
        )
        for pair, base in zip(pairs, base_records, strict=True)
    ]
    return OverlayMetadata(
        unit_size=plan.config.unit_size,
        creator={"name": "vmdelta-core", "version": core_version()},
        components=components,
        images=images,
        settings=describe_config(plan.config),
    )


@attrs.define
class _Scan:
    """What reading one image ahead found: its changed units, the digest of the image when it was
    read whole on the way, and of its artifact file when that is another file; ``done``: bytes
    compared so far (for a progress bar drawn by whoever waits for it); ``stopped``: give up."""

    changed: np.ndarray | None = None
    running: ImageDigest | None = None
    artifact: str | None = None
    done: int = 0
    stopped: bool = False


class _Stopped(Exception):
    """A scan given up: the overlay failed elsewhere."""


def _scan(pair: OpenedPair, unit: int, scan: _Scan) -> _Scan:
    """Compare an image with its base (digesting it on the way when it is read whole) and digest
    its artifact file, into ``scan``: reads only, so it runs while other images are encoded."""
    modified = pair.modified
    use_hints = _use_hints(pair)
    scan.running = None if use_hints else ImageDigest()

    def advance(n: int) -> None:
        if scan.stopped:
            raise _Stopped
        scan.done += n

    scan.changed = changed_units(pair.base, modified, unit, progress=advance, use_hints=use_hints, digest=scan.running)
    if modified.exact_artifact and not _same_file(modified.file, pair.plan.spec.modified):
        scan.artifact = file_digest(pair.plan.spec.modified)
    return scan


def _scanned(name: str, size: int, scan: Future[_Scan], state: _Scan, progress: Progress) -> _Scan:
    """The scan's outcome, a bar following it while it is under way."""
    if not scan.done():
        advance = progress.start(f"compare {name}", size)
        told = 0
        while not wait([scan], timeout=0.1).done:
            advance(state.done - told)
            told = state.done
    return scan.result()


def _encode_image(
    number: int,
    pair: OpenedPair,
    image: ImageRecord,
    units: UnitEncoder,
    registry: Registry,
    progress: Progress,
    scan: tuple[Future[_Scan], _Scan],
) -> ImageRecord:
    """Every stage of one image: envelope, changes (read ahead by ``scan``), filters, dedup and
    encoding, digest; ``image`` completed with their outcome."""
    unit = units.unit
    name, modified = pair.plan.name, pair.modified
    # the envelope first: a reader streaming the artifact out needs its head before the pages
    envelope = _store_envelope(number, pair, units.writer)
    scanned = _scanned(name, modified.size, *scan, progress)
    changed = scanned.changed
    assert changed is not None
    selection = select_units(pair, changed, registry, unit)
    counts = units.write(number, pair, selection.kept, progress.start(f"encode {name}", selection.kept.size * unit))
    digest, artifact_digest = _digests(pair, selection, scanned.running, unit, progress, scanned.artifact)
    return attrs.evolve(
        image,
        digest=digest,
        statistics=attrs.evolve(
            counts,
            units=-(-modified.size // unit),
            changed=int(changed.size),
            dropped={f.name: f.dropped for f in selection.filters},
        ),
        artifact_digest=artifact_digest,
        envelope=envelope,
        filters=selection.filters,
    )


def _use_hints(pair: OpenedPair) -> bool:
    """Whether to compare only the units the source hints at: hints hold against the file the
    modified was made from; against another base they lie."""
    return pair.modified.hints is not None and _same_file(pair.modified.hints_base, pair.plan.spec.base)


def _store_envelope(number: int, pair: OpenedPair, writer: OverlayWriter) -> EnvelopeRecord | None:
    envelope, base_envelope = pair.modified.envelope, pair.base.envelope
    if not (envelope or base_envelope):
        return None
    stored = compress_envelope(envelope, base_envelope)
    writer.add_envelope(number, stored, len(envelope))
    return EnvelopeRecord(len(envelope), len(stored))


def _digests(
    pair: OpenedPair,
    selection: Selection,
    running: ImageDigest | None,
    unit: int,
    progress: Progress,
    artifact: str | None = None,
) -> tuple[str, str | None]:
    """The digest of the image apply rebuilds (with dropped units as the base has them), and of
    the artifact when the source reproduces it byte for byte (``artifact``, when it was taken
    already)."""
    modified, dropped = pair.modified, selection.dropped
    if running is not None and not dropped.size:
        digest = running.hexdigest()
    else:
        advance = progress.start(f"digest {pair.plan.name}", modified.size)
        digest = image_digest(modified, unit, advance, replaced=(pair.base, dropped) if dropped.size else None)
    if not modified.exact_artifact or dropped.size:
        return digest, None
    # an image that is its file byte for byte has one digest for both
    spec = pair.plan.spec
    if _same_file(modified.file, spec.modified):
        return digest, digest
    return digest, artifact or file_digest(spec.modified)


def _same_file(a: Path | None, b: Path) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _metadata(
    skeleton: OverlayMetadata, images: list[ImageRecord], plan: OverlayPlan, writer: OverlayWriter
) -> OverlayMetadata:
    """The overlay's metadata, once every frame is written (the stored sizes are final then)."""
    names = {choice.ref: name for name, choice in plan.refs.items()}
    return attrs.evolve(
        skeleton, images=[_with_stored_bytes(number, image, names, writer) for number, image in enumerate(images)]
    )


def _with_stored_bytes(number: int, image: ImageRecord, names: dict[int, str], writer: OverlayWriter) -> ImageRecord:
    """``image`` with its share of the compressed frames: in all, per encoder (by the size of its
    items in each frame), and for the references."""
    stats = image.statistics
    encoders = dict(stats.encoders)
    references = 0.0
    for (img, ref), share in writer.stored_bytes_by_ref.items():
        if img != number:
            continue
        if ref in names and names[ref] in encoders:
            encoders[names[ref]] = attrs.evolve(encoders[names[ref]], stored_bytes=round(share))
        else:
            references += share
    stats = attrs.evolve(
        stats,
        encoders=encoders,
        stored_bytes=writer.stored_bytes_by_image.get(number, 0),
        references_stored_bytes=round(references),
    )
    return attrs.evolve(image, statistics=stats)
