"""``create``: artifacts -> sources -> change detection -> filters -> dedup -> encoders -> overlay."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from vmdelta_core.components import FilterContext, FilterResult, SourceImage
from vmdelta_core.config import (
    PATH_OPTIONS,
    CreateConfig,
    ImageSpec,
    check_codec_level,
    check_filter_options,
    check_source_options,
    describe_config,
    recorded_name,
)
from vmdelta_core.create.changes import changed_units, unit_bytes
from vmdelta_core.create.dedup import ENCODE, DedupBase, Deduplicator
from vmdelta_core.create.encode import EncoderChoice, EncodingPolicy
from vmdelta_core.errors import ConfigError, PluginError
from vmdelta_core.fileio import check_input
from vmdelta_core.index import image_digest, load_or_build_index
from vmdelta_core.jsonvalue import find_problem, path_text
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.container import FORMAT_VERSION, OverlayWriter
from vmdelta_core.overlay.digest import ImageDigest, file_digest
from vmdelta_core.overlay.envelope import compress_envelope
from vmdelta_core.overlay.schema import ItemType, Ref
from vmdelta_core.plugins import core_version
from vmdelta_core.records import CreateReport, ImageReport, NullProgress, Progress
from vmdelta_core.registry import FALLBACK_SOURCE, ComponentInfo, Registry, default_registry

__all__ = ["create_overlay", "image_names"]

BATCH_UNITS = 4096
_IN_FLIGHT_BYTES = 512 << 20
_FREE_REFS = (0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 0x0)
_RESERVED_REFS = frozenset(int(r) for r in (Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM, Ref.ZEROS, Ref.SELF_HASH))


def image_names(kinds: list[str]) -> list[str]:
    """``memory``, ``disk0``, ``disk1``... in overlay order."""
    names, disks = [], 0
    for kind in kinds:
        if kind == "memory":
            names.append("memory")
        else:
            names.append(f"disk{disks}")
            disks += 1
    return names


def _component(info: ComponentInfo, **extra: Any) -> dict[str, Any]:
    return {"kind": info.kind, "name": info.name, "distribution": info.distribution, "version": info.version, **extra}


def assign_refs(
    registry: Registry, names: list[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, EncoderChoice]:
    """Ref ids for the encoders an overlay uses: classic ids where free, else the spare nibbles;
    encoders given options are configured copies (their ``configure(options)``)."""
    options = options or {}
    unused = set(options) - {"raw", *names}
    if unused:
        raise ConfigError(f"options for encoder {sorted(unused)[0]!r}, which this overlay does not use")
    choices: dict[str, EncoderChoice] = {}
    taken: set[int] = set()
    for name in ["raw", *names]:
        if name in choices:
            continue
        encoder = registry.encoder(name)
        if options.get(name):
            configure = getattr(encoder, "configure", None)
            if configure is None:
                raise ConfigError(f"encoder {name!r} takes no options")
            encoder = configure(dict(options[name]))
        wanted = getattr(encoder, "wire_ref", None)
        if wanted is not None and (wanted in _RESERVED_REFS or not 0 <= wanted <= 0xF):
            raise PluginError(f"encoder {name!r} asks for ref id {wanted:#x}, which is reserved")
        if wanted is None or wanted in taken:
            wanted = next((r for r in _FREE_REFS if r not in taken), None)
            if wanted is None:
                raise ConfigError("too many encoders for one overlay (at most 11)")
        taken.add(wanted)
        choices[name] = EncoderChoice(name, wanted, encoder)
    return choices


def resolve_encoders(
    registry: Registry, names: tuple[str, ...] | None, policy: str | None
) -> tuple[tuple[str, ...], str]:
    """The encoders and policy an image uses: as configured, or the defaults of what is installed.

    The default list is every installed encoder that declares a ``default_priority`` (lowest
    first), then ``raw``; the default policy is ``best`` when that is more than ``raw``.
    """
    if names is None:
        ranked = sorted(
            (
                info
                for info in registry
                if info.kind == "encoder" and getattr(info.component, "default_priority", None) is not None
            ),
            key=lambda info: (info.component.default_priority, info.name),
        )
        names = (*(info.name for info in ranked if info.name != "raw"), "raw")
    for name in names:
        registry.info("encoder", name)
    if policy is None:
        policy = "best" if set(names) - {"raw"} else "fixed"
    return tuple(names), policy


@attrs.define(eq=False)
class _Opened:
    spec: ImageSpec
    name: str
    base_source: str
    source: str
    base: SourceImage
    modified: SourceImage


def create_overlay(
    config: CreateConfig, *, registry: Registry | None = None, progress: Progress | None = None
) -> CreateReport:
    """Create the overlay ``config.output`` from the image pairs of ``config``.

    The output appears only when everything succeeded; an existing file of that name is replaced
    then and not before.
    """
    started = time.monotonic()
    registry = registry or default_registry()
    progress = progress or NullProgress()
    unit = config.unit_size
    _check_inputs(config)
    codec_info = registry.info("codec", config.codec)
    check_codec_level(codec_info.component, config.level)
    choices = {id(spec): resolve_encoders(registry, spec.encoders, spec.policy) for spec in config.images}
    encoder_names = sorted({name for names, _ in choices.values() for name in names})
    refs = assign_refs(registry, encoder_names, config.encoder_options)
    for spec in config.images:
        for f in spec.filters:
            filt = registry.filter(f.name)
            check_filter_options(filt, f.options)
            if spec.kind not in filt.kinds:
                raise ConfigError(f"filter {f.name!r} does not apply to {spec.kind} images")
            if getattr(filt, "needs_input", False) and f.input is None:
                raise ConfigError(f"filter {f.name!r} needs an input: --filter {f.name}:FILE")
            if f.input is not None:
                check_input(f.input, f"filter {f.name!r}: input")

    with contextlib.ExitStack() as stack:
        # the output is checked, and its file made, before anything is read
        outputs = stack.enter_context(OutputSet(_inputs(config)))
        pending = outputs.add(config.output)
        names = image_names([spec.kind for spec in config.images])
        sources = [_sources_of(registry, spec) for spec in config.images]
        # parsing an artifact is mostly I/O and numpy: open them all at once
        jobs = [
            (registry.source(src), path, spec.kind, options)
            for spec, (base_source, source) in zip(config.images, sources, strict=True)
            for src, path, options in (
                (base_source, spec.base, spec.base_options),
                (source, spec.modified, spec.modified_options),
            )
        ]
        sizes = [path.stat().st_size for _, path, _, _ in jobs]
        images = _open_all(jobs, config.threads, stack, progress.start("open artifacts", sum(sizes)))
        opened = [
            _Opened(spec, name, base_source, source, images[2 * k], images[2 * k + 1])
            for k, (spec, name, (base_source, source)) in enumerate(zip(config.images, names, sources, strict=True))
        ]

        bases: list[DedupBase] = []
        ordinals = {"memory": 0, "disk": 0}
        base_meta: list[dict[str, Any]] = []
        for item in opened:
            advance = progress.start(f"index {item.spec.base.name}", item.base.size)
            index, cached = load_or_build_index(
                item.spec.base,
                item.base,
                source=item.base_source,
                unit=unit,
                options=dict(item.spec.base_options),
                cache_dir=config.cache_dir,
                progress=advance,
            )
            if cached:
                advance(item.base.size)
            ref = Ref.BASE_MEM if item.spec.kind == "memory" else Ref.BASE_DISK
            bases.append(DedupBase(int(ref), ordinals[item.spec.kind], item.base, index))
            ordinals[item.spec.kind] += 1
            base_meta.append(
                {
                    "name": recorded_name(item.spec.base),
                    "source": item.base_source,
                    "size": item.base.size,
                    "fingerprint": index.fingerprint,
                }
            )

        dedup = Deduplicator(unit, bases, [item.modified for item in opened])
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="vmdelta"))
        try:
            size, metadata, images_meta = _write_overlay(
                pending.path, config, registry, codec_info, refs, choices, opened, base_meta, dedup, pool, progress
            )
        except OSError as exc:
            raise outputs.explain(exc, config.output) from None
        outputs.commit()
    return CreateReport(
        output=config.output,
        size=size,
        seconds=time.monotonic() - started,
        images=tuple(ImageReport.from_metadata(image) for image in images_meta),
        metadata=metadata,
    )


def _write_overlay(
    path: Path,
    config: CreateConfig,
    registry: Registry,
    codec_info: ComponentInfo,
    refs: Mapping[str, EncoderChoice],
    choices: Mapping[int, tuple[tuple[str, ...], str]],
    opened: list[_Opened],
    base_meta: list[dict[str, Any]],
    dedup: Deduplicator,
    pool: ThreadPoolExecutor,
    progress: Progress,
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Encode every image into the overlay file at ``path``: its size, metadata and images."""
    with open(path, "wb") as f:
        writer = OverlayWriter(
            f,
            codec=codec_info.component,
            codec_id=0,
            level=config.level,
            frame_size=config.frame_size,
            pool=pool,
            # two frames a thread keeps every core busy; never more than 512 MiB of them at once
            in_flight=max(2, min(config.threads * 2, _IN_FLIGHT_BYTES // config.frame_size)),
        )
        images_meta = []
        try:
            for number, item in enumerate(opened):
                meta = _encode_image(
                    number, item, config, registry, refs, choices[id(item.spec)], dedup, writer, pool, progress
                )
                meta["base"] = base_meta[number]
                images_meta.append(meta)
        except BaseException:
            writer.abort()
            raise
        writer.flush()
        metadata = _metadata(config, registry, codec_info, refs, opened, images_meta, writer)
        problem = find_problem(metadata)
        if problem is not None:  # a source's layout or a filter's details that apply would refuse
            path, what = problem
            raise PluginError(f"overlay metadata: {path_text(path)} {what}; the overlay was not written")
        size = writer.finish(metadata)
        f.flush()
    return size, metadata, images_meta


def _open_all(
    jobs: list[tuple[Any, Path, str, Mapping[str, Any]]],
    threads: int,
    stack: contextlib.ExitStack,
    advance: Callable[[int], None],
) -> list[SourceImage]:
    """Open every artifact on a few threads; whatever opened is closed by ``stack``, even when
    another open fails."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
        futures = [pool.submit(source.open, path, kind=kind, options=options) for source, path, kind, options in jobs]
        first_error: BaseException | None = None
        images = []
        for future, (_, path, _, _) in zip(futures, jobs, strict=True):
            try:
                images.append(stack.enter_context(future.result()))
                advance(path.stat().st_size)
            except BaseException as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
    return images


def _check_inputs(config: CreateConfig) -> None:
    for spec in config.images:
        check_input(spec.base, f"base {spec.kind}")
        check_input(spec.modified, f"modified {spec.kind}")
        for options in (spec.base_options, spec.modified_options):
            for key, value in options.items():
                if key in PATH_OPTIONS and isinstance(value, str | Path):
                    check_input(value, f"{spec.kind} option {key}:")


def _inputs(config: CreateConfig) -> list[Path]:
    """Every file ``create`` reads: the overlay may be none of them."""
    inputs: list[Path] = []
    for spec in config.images:
        inputs += [spec.base, spec.modified]
        for options in (spec.base_options, spec.modified_options):
            inputs += [Path(v) for k, v in options.items() if k in PATH_OPTIONS and isinstance(v, str | Path)]
        inputs += [f.input for f in spec.filters if f.input is not None]
    return inputs


def _sources_of(registry: Registry, spec: ImageSpec) -> tuple[str, str]:
    """The sources that read the base and the modified artifact of ``spec``.

    A modified artifact no plugin recognises beside a base one does (an empty file, a QEMU stream
    with a damaged magic) would be diffed as plain bytes against a parsed image: refused.
    """
    base_source = spec.format or registry.detect_source(spec.base, spec.kind)
    source = spec.format or registry.detect_source(spec.modified, spec.kind)
    if base_source != source and FALLBACK_SOURCE in (base_source, source):
        plain, parsed = (spec.base, spec.modified) if base_source == FALLBACK_SOURCE else (spec.modified, spec.base)
        raise ConfigError(
            f"{parsed} is read by the {source if plain == spec.base else base_source} source but {plain} is not "
            f"recognised (empty or damaged?); base and modified must be the same kind of artifact "
            f"(--{spec.kind}-format forces one)"
        )
    for src in (base_source, source):
        if spec.kind not in registry.source(src).kinds:
            raise ConfigError(f"source {src!r} does not read {spec.kind} images")
    check_source_options(registry.source(base_source), spec.base_options, f"base_options of {spec.base}")
    check_source_options(registry.source(source), spec.modified_options, f"modified_options of {spec.modified}")
    return base_source, source


def _encode_image(
    number: int,
    item: _Opened,
    config: CreateConfig,
    registry: Registry,
    refs: Mapping[str, EncoderChoice],
    encoding: tuple[tuple[str, ...], str],
    dedup: Deduplicator,
    writer: OverlayWriter,
    pool: ThreadPoolExecutor,
    progress: Progress,
) -> dict[str, Any]:
    unit = config.unit_size
    spec, base, modified = item.spec, item.base, item.modified
    # hints hold against the file the modified was made from; against another base they lie
    use_hints = modified.hints is not None and _same_file(modified.hints_base, spec.base)
    advance = progress.start(f"compare {item.name}", modified.size)
    # reading the whole modified image anyway: take its digest on the way
    running = None if use_hints else ImageDigest()
    changed = changed_units(base, modified, unit, progress=advance, use_hints=use_hints, digest=running)
    stats: dict[str, Any] = {"units": -(-modified.size // unit), "changed": int(changed.size)}

    filters_meta = []
    dropped_all: list[np.ndarray] = []
    kept = changed
    for f in spec.filters:
        component = registry.filter(f.name)
        context = FilterContext(item.name, spec.kind, unit, base, modified, f.input, dict(f.options))
        result = component.select(context, kept.copy())
        drop = _checked_mask(f.name, result, kept)
        dropped_all.append(kept[drop])
        filters_meta.append(
            {
                "name": f.name,
                "input": recorded_name(f.input) if f.input else None,
                "input_fingerprint": file_digest(f.input) if f.input else None,
                "reason": result.reason,
                "dropped": int(drop.sum()),
                "details": dict(result.details),
            }
        )
        kept = kept[~drop]
    dropped = np.sort(np.concatenate(dropped_all)) if dropped_all else np.zeros(0, dtype=np.int64)
    last = -(-modified.size // unit) - 1
    if modified.size > base.size and (not kept.size or kept[-1] != last):
        # an image larger than its base carries its last unit, zero or not (a filter may not drop
        # it): apply believes a size past the base only as far as the items reach
        kept = np.append(kept, np.int64(last))
        for meta, gone in zip(filters_meta, dropped_all, strict=True):
            if last in gone:
                meta["dropped"] -= 1
        dropped = dropped[dropped != last]
    stats["dropped"] = {m["name"]: m["dropped"] for m in filters_meta}

    encoder_names, policy_name = encoding
    policy = EncodingPolicy([refs[name] for name in encoder_names], refs["raw"], policy_name, pool)
    by_ref = {choice.ref: choice.name for choice in refs.values()}
    counts = {"zero": 0, "base_memory": 0, "base_disk": 0, "self": 0}
    encoder_stats: dict[str, dict[str, int]] = {}
    item_type = int(ItemType.MEMORY if spec.kind == "memory" else ItemType.DISK)
    full = modified.size // unit
    advance = progress.start(f"encode {item.name}", int(kept.size) * unit)
    for start in range(0, kept.size, BATCH_UNITS):
        batch = kept[start : start + BATCH_UNITS]
        whole = batch[batch < full]
        classes, values = dedup.classify(number, whole)
        if whole.size < batch.size:  # the short last unit: zero or encoded, never deduplicated
            tail_zero = not modified.data[full * unit :].any()
            classes = np.append(classes, np.uint8(Ref.ZEROS if tail_zero else ENCODE))
            values = np.append(values, np.uint64(0))
        lengths = np.minimum(unit, modified.size - batch * unit)
        payloads: list[bytes | None] = [None] * batch.size
        refs_out = classes.astype(np.uint8)
        todo = np.flatnonzero(classes == ENCODE)
        if todo.size:
            bases_mv = [
                memoryview(unit_bytes(base, i, unit, int(n)))
                for i, n in zip(batch[todo].tolist(), lengths[todo].tolist(), strict=True)
            ]
            targets = [
                memoryview(modified.data[i * unit : i * unit + int(n)])
                for i, n in zip(batch[todo].tolist(), lengths[todo].tolist(), strict=True)
            ]
            enc_refs, enc_payloads = policy.encode(bases_mv, targets)
            for row, ref, payload in zip(todo.tolist(), enc_refs, enc_payloads, strict=True):
                refs_out[row] = ref
                payloads[row] = payload
                entry = encoder_stats.setdefault(by_ref[ref], {"units": 0, "bytes": 0})
                entry["units"] += 1
                entry["bytes"] += len(payload)
        counts["zero"] += int((classes == Ref.ZEROS).sum())
        counts["base_memory"] += int((classes == Ref.BASE_MEM).sum())
        counts["base_disk"] += int((classes == Ref.BASE_DISK).sum())
        counts["self"] += int((classes == Ref.SELF).sum())
        writer.add_items(
            number,
            (batch * unit).astype(np.uint64),
            lengths,
            refs_out,
            np.full(batch.size, item_type, dtype=np.uint8),
            values,
            payloads,
        )
        advance(int(batch.size) * unit)
        # what this batch read (its units, their bases, dedup confirmations anywhere in the
        # bases and earlier images) is done with: keep memory bounded by the batch, not the image
        for image in dedup.images:
            image.release(0, image.size)
        for dedup_base in dedup.bases:
            dedup_base.image.release(0, dedup_base.image.size)
    stats.update(counts)
    stats["encoders"] = encoder_stats

    envelope_meta = None
    if modified.envelope or base.envelope:
        stored = compress_envelope(modified.envelope, base.envelope)
        writer.add_envelope(number, stored, len(modified.envelope))
        envelope_meta = {"length": len(modified.envelope), "stored": len(stored)}

    if running is not None and not dropped.size:
        digest = running.hexdigest()
    else:
        advance = progress.start(f"digest {item.name}", modified.size)
        digest = image_digest(modified, unit, advance, replaced=(base, dropped) if dropped.size else None)
    artifact_digest = None
    if modified.exact_artifact and not dropped.size:
        # an image that is its file byte for byte has one digest for both
        artifact_digest = digest if _same_file(modified.file, spec.modified) else file_digest(spec.modified)
    return {
        "name": item.name,
        "kind": spec.kind,
        "source": item.source,
        "base_source": item.base_source,
        "artifact": recorded_name(spec.modified),
        "size": modified.size,
        "digest": digest,
        "artifact_digest": artifact_digest,
        "layout": dict(modified.layout),
        "envelope": envelope_meta,
        "filters": filters_meta,
        "encoders": list(encoder_names),
        "policy": policy_name,
        "statistics": stats,
    }


def _same_file(a: Path | None, b: Path) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _checked_mask(name: str, result: FilterResult, candidates: np.ndarray) -> np.ndarray:
    drop = np.asarray(result.drop)
    if drop.dtype != np.bool_ or drop.shape != candidates.shape:
        raise PluginError(
            f"filter {name!r} answered with a mask of {drop.dtype} {drop.shape} for {candidates.shape[0]} candidates"
        )
    return drop


def _metadata(
    config: CreateConfig,
    registry: Registry,
    codec_info: ComponentInfo,
    refs: Mapping[str, EncoderChoice],
    opened: list[_Opened],
    images: list[dict[str, Any]],
    writer: OverlayWriter,
) -> dict[str, Any]:
    components = [_component(codec_info, id=0)]
    components += [_component(registry.info("encoder", name), ref=choice.ref) for name, choice in sorted(refs.items())]
    sources = sorted({s for item in opened for s in (item.source, item.base_source)})
    components += [_component(registry.info("source", name)) for name in sources]
    filters = sorted({f.name for spec in config.images for f in spec.filters})
    components += [_component(registry.info("filter", name)) for name in filters]
    names = {choice.ref: name for name, choice in refs.items()}
    for number, image in enumerate(images):
        stats = image["statistics"]
        stats["stored_bytes"] = writer.stored_bytes_by_image.get(number, 0)
        # each encoder's share of the compressed frames, by the size of its items in them
        references = 0.0
        for (img, ref), share in writer.stored_bytes_by_ref.items():
            if img != number:
                continue
            if ref in names and names[ref] in stats["encoders"]:
                stats["encoders"][names[ref]]["stored_bytes"] = round(share)
            else:
                references += share
        stats["references_stored_bytes"] = round(references)
    return {
        "format": "vmdelta-overlay",
        "version": FORMAT_VERSION,
        "creator": {"name": "vmdelta-core", "version": core_version()},
        "unit_size": config.unit_size,
        "components": components,
        "images": images,
        "settings": describe_config(config),
    }
