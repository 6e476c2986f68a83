"""Trusting nothing before it is checked: the overlay against the command, the bases against the
overlay.

Everything here runs before a single output byte is written: the overlay's checksums, its
metadata, the images the command gives against those it holds, the components it needs, and
every base against the fingerprint recorded at create time.
"""

from __future__ import annotations

import contextlib

import attrs

from vmdelta_core.apply.feed import FileFeed, StreamFeed
from vmdelta_core.baseimage import open_base_image
from vmdelta_core.components import Codec, Encoder, SourceImage
from vmdelta_core.config import ApplyConfig, ApplyImageSpec, check_side_files, check_source_options
from vmdelta_core.errors import BaseMismatchError, ConfigError, FormatError, PluginError
from vmdelta_core.fileio import check_input
from vmdelta_core.index import image_digest, load_or_build_index
from vmdelta_core.overlay.digest import ImageDigest, digest_kind
from vmdelta_core.overlay.metadata import ImageRecord, OverlayMetadata
from vmdelta_core.records import Progress
from vmdelta_core.registry import Registry

__all__ = ["Decoders", "check_claimed_size", "finish_overlay", "open_base", "read_overlay"]


def read_overlay(feed: FileFeed | StreamFeed, config: ApplyConfig, progress: Progress) -> OverlayMetadata:
    """The overlay's checked metadata (of a stream: its prologue), its images matched against the
    command; a file's bytes are verified first."""
    meta = OverlayMetadata.from_json(feed.start(progress), feed.frames_seen, prologue=feed.partial)
    feed.bind(meta)
    _match_images(meta, config)
    if not feed.partial:
        _check_strict(meta, config)
    return meta


def finish_overlay(feed: FileFeed | StreamFeed, meta: OverlayMetadata, config: ApplyConfig) -> OverlayMetadata:
    """The whole metadata, once every frame has come: of a stream, its prologue completed by the
    epilogue and checked, now that the stream's end is."""
    document = feed.finish()
    if not feed.partial:
        return meta
    whole = OverlayMetadata.from_json(document)
    _check_strict(whole, config)
    return whole


def _check_strict(meta: OverlayMetadata, config: ApplyConfig) -> None:
    if config.strict:
        lossy = {f.name: f.dropped for image in meta.images for f in image.filters if f.dropped}
        if lossy:
            dropped = ", ".join(f"{n} dropped {c}" for n, c in lossy.items())
            raise ConfigError(f"--strict: this overlay rebuilds some units from the base ({dropped})")


def _match_images(meta: OverlayMetadata, config: ApplyConfig) -> None:
    want = [image.kind for image in meta.images]
    got = [spec.kind for spec in config.images]
    if want != got:

        def describe(kinds: list[str]) -> str:
            disks = kinds.count("disk")
            parts = (["--memory"] if "memory" in kinds else []) + ([f"{disks} --disk"] if disks else [])
            return " and ".join(parts) or "nothing"

        raise ConfigError(f"this overlay holds {describe(want)} pair(s); the command gave {describe(got)}")
    if sorted(got, key=lambda k: k != "memory") != got:
        raise ConfigError("internal: memory image must come first")


@attrs.frozen
class Decoders:
    """The installed components an overlay needs: codecs by frame id, encoders by ref."""

    codecs: dict[int, Codec]
    encoders: dict[int, Encoder]

    @classmethod
    def find(cls, meta: OverlayMetadata, registry: Registry) -> Decoders:
        """:raises PluginError: naming the distribution to install for a missing component."""
        found: dict[tuple[str, str], object] = {}
        for c in meta.components:
            if c.kind == "filter":
                continue
            try:
                found[c.kind, c.name] = registry.info(c.kind, c.name).component
            except PluginError:
                raise PluginError(
                    f"this overlay needs the {c.kind} {c.name!r} from {c.distribution} {c.version}; "
                    f"{registry.remedy(c.distribution, c.version)}"
                ) from None
        for number, image in enumerate(meta.images):
            if image.kind not in registry.source(image.source).kinds:
                raise FormatError(
                    f"overlay metadata: images[{number}] names source {image.source!r}, "
                    f"which does not write {image.kind} images"
                )
        return cls(
            {ident: found["codec", c.name] for ident, c in meta.codecs().items()},  # type: ignore[misc]
            {ref: found["encoder", c.name] for ref, c in meta.encoders().items()},  # type: ignore[misc]
        )


def open_base(
    stack: contextlib.ExitStack,
    registry: Registry,
    meta: OverlayMetadata,
    image: ImageRecord,
    spec: ApplyImageSpec,
    config: ApplyConfig,
    progress: Progress,
    held: SourceImage | None = None,
) -> SourceImage:
    """Open a base (or take ``held``, the same base already open, which its holder closes) and
    prove it is the one the overlay was made from."""
    source = registry.source(image.base_source)
    for path, what in spec.input_checks():
        check_input(path, what)
    check_source_options(source, spec.base_options, f"base_options of {spec.base}")
    check_side_files(source, spec.base_sides, f"base side files of {spec.base}")
    check_side_files(registry.source(image.source), spec.output_sides, f"output side files of {spec.output}")
    if held is not None and held.kind == image.kind:
        base = held
    else:
        opened = open_base_image(
            source,
            image.base_source,
            spec.base,
            kind=image.kind,
            options=spec.open_options(),
            cache_dir=config.cache_dir,
        )
        base = stack.enter_context(opened)
    expected = image.base
    if base.size != expected.size:
        raise BaseMismatchError(
            f"{spec.base} is not the base this overlay was made from: "
            f"{base.size} bytes, expected {expected.size} ({expected.name})"
        )
    advance = progress.start(f"check base {spec.base.name}", base.size)
    kind = digest_kind(expected.fingerprint)
    if kind is ImageDigest:
        fingerprint = load_or_build_index(
            spec.base,
            base,
            source=image.base_source,
            unit=meta.unit_size,
            options=spec.open_options(),
            cache_dir=config.cache_dir,
            progress=advance,
        )[0].fingerprint
    else:  # an overlay from before the chunked digest: its base's digest as it was taken then
        fingerprint = image_digest(base, meta.unit_size, advance, kind=kind)
    if fingerprint != expected.fingerprint:
        raise BaseMismatchError(
            f"{spec.base} is not the base this overlay was made from (fingerprint differs from {expected.name})"
        )
    return base


def check_claimed_size(reach: int, image: ImageRecord, base: SourceImage) -> None:
    """An image may be larger than its base only as far as its items ``reach``: a claimed size
    beyond that would cost time (hashing zeros) for data that is not there."""
    if image.size > max(base.size, reach):
        raise FormatError(
            f"overlay claims {image.name} is {image.size} bytes, but its base holds {base.size} and its "
            f"items reach only byte {reach}: refusing an implausible size"
        )
