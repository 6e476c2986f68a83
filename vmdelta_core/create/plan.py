"""The plan of an overlay: a config checked against what is installed, before any artifact is
opened (only the first 4 KiB of an artifact of no given format are read, to detect it).

Everything a config can get wrong that does not need the artifacts' bytes is found here: an
unknown codec, level, encoder, filter or source, a filter on the wrong kind of image or missing
its input, a file that is not there. The plan then names, for every image, the sources that read
it and the encoders it uses, and for the overlay the ref id each encoder is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmdelta_core.config import (
    CreateConfig,
    ImageSpec,
    check_codec_level,
    check_filter_options,
    check_side_files,
    check_source_options,
    size_mode,
)
from vmdelta_core.create.encode import EncoderChoice
from vmdelta_core.errors import ConfigError, PluginError
from vmdelta_core.fileio import check_input
from vmdelta_core.overlay.schema import NON_PAYLOAD_REFS
from vmdelta_core.registry import FALLBACK_SOURCE, ComponentInfo, Registry

__all__ = ["ImagePlan", "OverlayPlan", "assign_refs", "image_names", "plan_overlay", "resolve_encoders"]

#: ref ids handed to encoders that want none of their own, or whose own is taken
_FREE_REFS = (0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 0x0)


@attrs.frozen
class ImagePlan:
    """One image pair: its name in the overlay, the sources that read it, how it is encoded."""

    spec: ImageSpec
    name: str
    base_source: str
    source: str
    encoders: tuple[str, ...]
    policy: str


@attrs.frozen
class OverlayPlan:
    """A config checked against the registry."""

    config: CreateConfig
    codec: ComponentInfo
    refs: Mapping[str, EncoderChoice]
    images: tuple[ImagePlan, ...]

    @property
    def inputs(self) -> list[Path]:
        """Every file ``create`` reads: the overlay may be none of them."""
        return [path for image in self.images for path in image.spec.input_paths()]


def plan_overlay(config: CreateConfig, registry: Registry) -> OverlayPlan:
    """Check ``config`` against ``registry`` and the file system; refuse before opening anything."""
    for spec in config.images:
        for path, what in spec.input_checks():
            check_input(path, what)
    config = size_mode(config, registry.codec(config.codec))
    codec = registry.info("codec", config.codec)
    check_codec_level(codec.component, config.level)  # type: ignore[arg-type]
    encodings = [resolve_encoders(registry, spec.encoders, spec.policy) for spec in config.images]
    refs = assign_refs(registry, sorted({name for names, _ in encodings for name in names}), config.encoder_options)
    for spec in config.images:
        _check_filters(registry, spec)
    names = image_names([spec.kind for spec in config.images])
    images = tuple(
        ImagePlan(spec, name, *_sources_of(registry, spec), encoders, policy)
        for spec, name, (encoders, policy) in zip(config.images, names, encodings, strict=True)
    )
    return OverlayPlan(config, codec, refs, images)


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


def assign_refs(
    registry: Registry, names: list[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, EncoderChoice]:
    """Ref ids for the encoders an overlay uses: classic ids where free, else the spare nibbles;
    encoders given options are configured copies (their ``configure(options)``)."""
    options = options or {}
    unused = set(options) - {"raw", *names}
    if unused:
        raise ConfigError(f"options for encoder {sorted(unused)[0]!r}, which this overlay does not use")
    encoders = {}
    for name in dict.fromkeys(["raw", *names]):
        encoder = registry.encoder(name)
        if options.get(name):
            configure = getattr(encoder, "configure", None)
            if configure is None:
                raise ConfigError(f"encoder {name!r} takes no options")
            encoder = configure(dict(options[name]))
        wanted = getattr(encoder, "wire_ref", None)
        if wanted is not None and (wanted in NON_PAYLOAD_REFS or not 0 <= wanted <= 0xF):
            raise PluginError(f"encoder {name!r} asks for ref id {wanted:#x}, which is reserved")
        encoders[name] = (encoder, wanted)
    # the ids encoders ask for first, in order; then the spare ones for the rest
    choices: dict[str, EncoderChoice] = {}
    taken: set[int] = set()
    for name, (encoder, wanted) in encoders.items():
        if wanted is not None and wanted not in taken:
            taken.add(wanted)
            choices[name] = EncoderChoice(name, wanted, encoder)
    for name, (encoder, _) in encoders.items():
        if name in choices:
            continue
        spare = next((r for r in _FREE_REFS if r not in taken), None)
        if spare is None:
            raise ConfigError(f"too many encoders for one overlay: no ref id is left for {name!r}")
        taken.add(spare)
        choices[name] = EncoderChoice(name, spare, encoder)
    return {name: choices[name] for name in encoders}


def resolve_encoders(
    registry: Registry, names: tuple[str, ...] | None, policy: str | None
) -> tuple[tuple[str, ...], str]:
    """The encoders and policy an image uses: as configured, or the defaults of what is installed.

    The default list is every installed encoder that declares a ``default_priority`` (lowest
    first), then ``raw``; the default policy is ``best`` when that is more than ``raw``.
    """
    if names is None:
        names = registry.default_encoders()
    for name in names:
        registry.info("encoder", name)
    if policy is None:
        policy = "best" if set(names) - {"raw"} else "fixed"
    return tuple(names), policy


def _check_filters(registry: Registry, spec: ImageSpec) -> None:
    for f in spec.filters:
        filt = registry.filter(f.name)
        check_filter_options(filt, f.options)
        if spec.kind not in filt.kinds:
            raise ConfigError(f"filter {f.name!r} does not apply to {spec.kind} images")
        if getattr(filt, "needs_input", False) and f.input is None:
            raise ConfigError(f"filter {f.name!r} needs an input: --filter {f.name}:FILE")


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
    check_side_files(registry.source(base_source), spec.base_sides, f"base side files of {spec.base}")
    check_side_files(registry.source(source), spec.modified_sides, f"modified side files of {spec.modified}")
    return base_source, source
