"""Pipeline configuration: the one object both the CLI flags and a TOML file build.

A TOML pipeline is validated against ``schemas/pipeline.schema.json`` and turned into a
:class:`CreateConfig`; the CLI builds the same object from its flags, so everything one can do the
other can.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import attrs

from vmdelta_core.errors import ConfigError

__all__ = [
    "DEFAULT_ENCODERS",
    "DEFAULT_POLICY",
    "ApplyConfig",
    "ApplyImageSpec",
    "CreateConfig",
    "FilterSpec",
    "ImageSpec",
    "load_pipeline",
    "parse_filter",
    "parse_option",
]

POLICIES = ("fixed", "first-smaller", "best")
#: ``None`` in a config means these defaults, resolved against the installed encoders at create
#: time: every encoder that declares a ``default_priority`` (in that order) and then ``raw``, chosen
#: per unit with ``best`` when there is more than raw, else ``fixed``
DEFAULT_ENCODERS = None
DEFAULT_POLICY = None
DEFAULT_UNIT = 4096
DEFAULT_FRAME = 4 << 20
MAX_FRAME = 64 << 20


def _paths(value: Any) -> Path:
    return Path(os.fspath(value))


@attrs.frozen
class FilterSpec:
    """A filter turned on for an image: ``--filter NAME[:INPUT]``."""

    name: str
    input: Path | None = attrs.field(default=None, converter=attrs.converters.optional(_paths))
    options: Mapping[str, Any] = attrs.field(factory=dict)


def parse_option(text: str, flag: str) -> tuple[str, str, Any]:
    """``xdelta3.level=9`` -> ("xdelta3", "level", 9); values are read as TOML values when they
    parse as one (numbers, booleans, quoted strings), else kept as plain strings."""
    target, sep, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not (sep and dot and name and key):
        raise ConfigError(f"{flag} {text!r}: expected NAME.KEY=VALUE")
    try:
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return name, key, parsed


def parse_filter(text: str) -> FilterSpec:
    """``trim:trace.log`` -> FilterSpec("trim", Path("trace.log")); ``xray`` -> no input."""
    name, sep, value = text.partition(":")
    if not name:
        raise ConfigError(f"--filter {text!r}: expected NAME or NAME:INPUT")
    return FilterSpec(name, Path(value) if sep and value else None)


@attrs.frozen
class ImageSpec:
    """One base/modified pair of artifacts and how to encode it."""

    kind: Literal["memory", "disk"] = attrs.field(validator=attrs.validators.in_(("memory", "disk")))
    base: Path = attrs.field(converter=_paths)
    modified: Path = attrs.field(converter=_paths)
    format: str | None = None
    encoders: tuple[str, ...] | None = attrs.field(default=DEFAULT_ENCODERS, converter=attrs.converters.optional(tuple))
    policy: str | None = attrs.field(
        default=DEFAULT_POLICY, validator=attrs.validators.optional(attrs.validators.in_(POLICIES))
    )
    filters: tuple[FilterSpec, ...] = attrs.field(default=(), converter=tuple)
    #: options passed to the source when opening the base / the modified artifact
    base_options: Mapping[str, Any] = attrs.field(factory=dict)
    modified_options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class CreateConfig:
    """Everything ``create`` needs."""

    output: Path = attrs.field(converter=_paths)
    images: tuple[ImageSpec, ...] = attrs.field(converter=tuple)
    unit_size: int = DEFAULT_UNIT
    codec: str = "zstd"
    level: int | None = None
    frame_size: int = DEFAULT_FRAME
    threads: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    cache_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(_paths))
    #: per encoder name, the options its ``configure`` takes (``{"xdelta3": {"level": 9}}``)
    encoder_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self.images:
            raise ConfigError("nothing to do: give at least one --memory or --disk pair")
        if sum(1 for image in self.images if image.kind == "memory") > 1:
            raise ConfigError("a VM has one memory image; give --memory once")
        if self.unit_size < 512 or self.unit_size > 65535 or self.unit_size % 512:
            raise ConfigError(f"unit size {self.unit_size} must be a multiple of 512 below 65536")
        if not 64 << 10 <= self.frame_size <= MAX_FRAME:
            raise ConfigError(f"frame size {self.frame_size} must be between 64 KiB and {MAX_FRAME >> 20} MiB")
        if self.threads < 1:
            raise ConfigError("threads must be at least 1")
        for image in self.images:
            if image.encoders is not None and (not image.encoders or not all(image.encoders)):
                raise ConfigError("an empty encoder name")


@attrs.frozen
class ApplyImageSpec:
    """One base artifact and where its rebuilt counterpart goes."""

    kind: Literal["memory", "disk"]
    base: Path = attrs.field(converter=_paths)
    output: Path = attrs.field(converter=_paths)
    output_format: str | None = None
    base_options: Mapping[str, Any] = attrs.field(factory=dict)
    output_options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ApplyConfig:
    """Everything ``apply`` needs."""

    overlay: Path = attrs.field(converter=_paths)
    images: tuple[ApplyImageSpec, ...] = attrs.field(converter=tuple)
    strict: bool = False
    threads: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    cache_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(_paths))


# --------------------------------------------------------------------------------------------
# TOML pipelines
# --------------------------------------------------------------------------------------------


def pipeline_schema() -> dict[str, Any]:
    text = resources.files("vmdelta_core").joinpath("schemas/pipeline.schema.json").read_text()
    return json.loads(text)


def load_pipeline(path: Path) -> CreateConfig:
    """Read and validate a TOML pipeline; relative paths are relative to the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_mapping(data, folder=path.parent, origin=str(path))


def config_from_mapping(data: Mapping[str, Any], *, folder: Path, origin: str = "pipeline") -> CreateConfig:
    import jsonschema  # only pipelines from files need it; keep the command line quick to start

    validator = jsonschema.Draft202012Validator(pipeline_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "top level"
        raise ConfigError(f"{origin}: {where}: {first.message}")

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else folder / p

    def resolve_options(options: Mapping[str, Any]) -> dict[str, Any]:
        # options that name files ("ram") are paths relative to the pipeline too
        return {k: str(resolve(v)) if k in PATH_OPTIONS and isinstance(v, str) else v for k, v in options.items()}

    overlay = data["overlay"]
    images = []
    for entry in data["images"]:
        filters: list[FilterSpec] = []
        for item in entry.get("filters", []):
            spec = (
                parse_filter(item)
                if isinstance(item, str)
                else FilterSpec(item["name"], item.get("input"), item.get("options", {}))
            )
            if spec.input is not None:
                spec = attrs.evolve(spec, input=resolve(str(spec.input)))
            filters.append(spec)
        images.append(
            ImageSpec(
                kind=entry["kind"],
                base=resolve(entry["base"]),
                modified=resolve(entry["modified"]),
                format=entry.get("format"),
                encoders=tuple(entry["encoders"]) if "encoders" in entry else DEFAULT_ENCODERS,
                policy=entry.get("policy", DEFAULT_POLICY),
                filters=tuple(filters),
                base_options=resolve_options(entry.get("base_options", {})),
                modified_options=resolve_options(entry.get("modified_options", {})),
            )
        )
    kwargs: dict[str, Any] = {
        k: overlay[k]
        for k in ("unit_size", "codec", "level", "frame_size", "threads", "encoder_options")
        if k in overlay
    }
    if "cache_dir" in overlay:
        kwargs["cache_dir"] = resolve(overlay["cache_dir"])
    return CreateConfig(output=resolve(overlay["output"]), images=tuple(images), **kwargs)


#: source options that name files: resolved against a pipeline's folder, and at apply time the
#: ``*_output`` ones are written atomically with the artifact and never over an input
PATH_OPTIONS = frozenset({"ram", "ram_output"})


def describe_config(config: CreateConfig) -> dict[str, Any]:
    """The settings recorded in an overlay: what was asked, without the creator's folders."""
    return {
        "unit_size": config.unit_size,
        "codec": config.codec,
        "level": config.level,
        "frame_size": config.frame_size,
        "encoder_options": {name: dict(options) for name, options in config.encoder_options.items()},
        "images": [
            {
                "kind": image.kind,
                "base": image.base.name,
                "modified": image.modified.name,
                "format": image.format,
                "encoders": list(image.encoders) if image.encoders is not None else "default",
                "policy": image.policy or "default",
                "filters": [
                    {"name": f.name, "input": f.input.name if f.input else None, "options": dict(f.options)}
                    for f in image.filters
                ],
            }
            for image in config.images
        ],
    }
