"""Pipeline configuration: the one object both the CLI flags and a TOML file build.

A TOML pipeline is validated against ``schemas/pipeline.schema.json`` and turned into a
:class:`CreateConfig`; the CLI builds the same object from its flags, so everything one can do the
other can.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from vmdelta_core.errors import ConfigError, PluginError
from vmdelta_core.fileio import check_input
from vmdelta_core.jsonvalue import MAX_INT, MIN_INT, find_problem, path_text
from vmdelta_core.limits import DEFAULT_CODEC, DEFAULT_FRAME, MAX_THREADS
from vmdelta_core.overlay.container import MAX_FRAME
from vmdelta_core.overlay.metadata import Settings
from vmdelta_core.overlay.schema import MAX_UNIT, MIN_UNIT

if TYPE_CHECKING:
    from vmdelta_core.components import Codec, Filter, Source

__all__ = [
    "DEFAULT_ENCODERS",
    "DEFAULT_POLICY",
    "MAX_LEVEL",
    "MAX_THREADS",
    "ApplyConfig",
    "ApplyImageSpec",
    "CreateConfig",
    "FilterSpec",
    "ImageSpec",
    "check_codec_level",
    "check_filter_options",
    "check_side_files",
    "check_source_options",
    "load_pipeline",
    "parse_filter",
    "parse_option",
    "recorded_name",
    "size_mode",
]

POLICIES = ("fixed", "first-smaller", "best")
KINDS = ("memory", "disk")
#: ``None`` in a config means these defaults, resolved against the installed encoders at create
#: time: every encoder that declares a ``default_priority`` (in that order) and then ``raw``, chosen
#: per unit with ``best`` when there is more than raw, else ``fixed``
DEFAULT_ENCODERS = None
DEFAULT_POLICY = None
DEFAULT_UNIT = 4096
#: the level that asks for the smallest overlay (``--level max``): see :func:`size_mode`
MAX_LEVEL = "max"
#: frames of the size mode, unless another size is asked: larger frames find more in each other
SIZE_MODE_FRAME = 16 << 20
MIN_FRAME = 64 << 10
#: an options mapping and the values in it, nested; the overlay's metadata records options a few
#: levels down, and :data:`vmdelta_core.jsonvalue.MAX_DEPTH` must still hold for it
MAX_OPTION_DEPTH = 16
#: a TOML pipeline, nested (its options included)
MAX_PIPELINE_DEPTH = 32


def _paths(value: Any) -> Path:
    try:
        path = Path(os.fspath(value))
    except TypeError:
        raise ConfigError(f"a path must be a string, not {_describe(value)}") from None
    if "\0" in str(path):
        raise ConfigError(f"the path {str(path)!r} holds a NUL character")
    return path


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


# attrs validators: every way in (flags, a TOML file, the API) meets the same checks, and a
# wrong value is a ConfigError, never a TypeError deep inside create


def _integer(what: str, low: int, high: int, *, optional: bool = False) -> Callable[[Any, Any, Any], None]:
    """A real int (never a bool, nor a float such as TOML's ``4096.0``) from ``low`` to ``high``."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{what} must be an integer, not {_describe(value)}")
        if not low <= value <= high:
            raise ConfigError(f"{what} {value} is out of range ({low} to {high})")

    return check


def _level(instance: Any, attribute: Any, value: Any) -> None:
    if value != MAX_LEVEL:
        _integer("level", MIN_INT, MAX_INT, optional=True)(instance, attribute, value)


def _one_of(what: str, allowed: tuple[str, ...], *, optional: bool = False) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{what} must be one of {', '.join(allowed)}, not {_describe(value)}")

    return check


def _name(what: str, *, optional: bool = False) -> Callable[[Any, Any, Any], None]:
    """A component's name: a non-empty string."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None or not optional:
            _check_name(value, what)

    return check


def _check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string, not {_describe(value)}")


def _options(what: str) -> Callable[[Any, Any, Any], None]:
    """Options (see :func:`check_option_values`)."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        check_option_values(value, what)

    return check


def _sides(what: str) -> Callable[[Any], dict[str, Path]]:
    """Side files (:class:`~vmdelta_core.components.SideFile`): a side file's name -> its path."""

    def convert(value: Any) -> dict[str, Path]:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{what} must map side-file names to files, not {_describe(value)}")
        out = {}
        for name, path in value.items():
            _check_name(name, f"a side-file name in {what}")
            if not isinstance(path, str | os.PathLike):
                raise ConfigError(f"{what}.{name} must be a file name, not {_describe(path)}")
            out[name] = _paths(path)
        return out

    return convert


def _names(value: Any) -> tuple[str, ...] | None:
    """Encoder names: a list of strings (a lone string is a mistake, not a list of its letters)."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"encoders must be a list of one or more names, not {_describe(value)}")
    for name in value:
        _check_name(name, "an encoder name")
    return tuple(value)


def check_option_values(options: Any, where: str) -> None:
    """Options map names to values JSON can hold, nested at most :data:`MAX_OPTION_DEPTH` deep:
    they are recorded in the overlay, and what is recorded must read back (a TOML date, another
    type, a number past 64 bits or deep nesting would not).

    :raises ConfigError: naming the option at fault.
    """
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where} must be a table of options, not {_describe(options)}")
    problem = find_problem(options, max_depth=MAX_OPTION_DEPTH)
    if problem is not None:
        path = path_text(problem[0])
        raise ConfigError(f"{where}{'' if not path or path.startswith('[') else '.'}{path} {problem[1]}")


def default_threads() -> int:
    """One worker per core, within :data:`MAX_THREADS`."""
    return max(1, min(os.cpu_count() or 1, MAX_THREADS))


def _tuple(what: str) -> Callable[[Any], tuple[Any, ...]]:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{what} must be a list, not {_describe(value)}")
        return tuple(value)

    return convert


def _boolean(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, not {_describe(value)}")


@attrs.frozen
class FilterSpec:
    """A filter turned on for an image: ``--filter NAME[:INPUT]``."""

    name: str = attrs.field(validator=_name("a filter name"))
    input: Path | None = attrs.field(default=None, converter=attrs.converters.optional(_paths))
    options: Mapping[str, Any] = attrs.field(factory=dict, validator=_options("filter options"))


def parse_option(text: str, flag: str) -> tuple[str, str, Any]:
    """``xdelta3.level=9`` -> ("xdelta3", "level", 9); values are read as TOML values when they
    parse as one (numbers, booleans, quoted strings, arrays), else kept as plain strings."""
    target, sep, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not (sep and dot and name and key):
        raise ConfigError(f"{flag} {text!r}: expected NAME.KEY=VALUE")
    try:
        document = _parse_toml(f"v = {value}", f"{flag} {target}")
        # one value, or it is text (``1\ny = 2`` parses as two keys: it is not one TOML value)
        parsed: Any = document["v"] if len(document) == 1 else value
    except tomllib.TOMLDecodeError:
        parsed = value
    check_option_values({key: parsed}, f"{flag} {name}")
    return name, key, parsed


def _parse_toml(text: str, what: str) -> dict[str, Any]:
    """``tomllib.loads`` with its other failures made ConfigErrors: nesting past the recursion
    limit, integers past Python's 4300 digits. A TOMLDecodeError is left to the caller."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise ConfigError(f"{what} is nested more than {MAX_PIPELINE_DEPTH} levels deep") from None
    except ValueError:  # int("9" * 5000): past Python's limit on digits
        raise ConfigError(f"{what} holds a number too large to read") from None


def parse_filter(text: str) -> FilterSpec:
    """``trim:trace.log`` -> FilterSpec("trim", Path("trace.log")); ``xray`` -> no input."""
    name, sep, value = text.partition(":")
    if not name:
        raise ConfigError(f"--filter {text!r}: expected NAME or NAME:INPUT")
    return FilterSpec(name, Path(value) if sep and value else None)


@attrs.frozen
class ImageSpec:
    """One base/modified pair of artifacts and how to encode it."""

    kind: Literal["memory", "disk"] = attrs.field(validator=_one_of("image kind", KINDS))
    base: Path = attrs.field(converter=_paths)
    modified: Path = attrs.field(converter=_paths)
    format: str | None = attrs.field(default=None, validator=_name("a source name (format)", optional=True))
    encoders: tuple[str, ...] | None = attrs.field(default=DEFAULT_ENCODERS, converter=_names)
    policy: str | None = attrs.field(default=DEFAULT_POLICY, validator=_one_of("policy", POLICIES, optional=True))
    filters: tuple[FilterSpec, ...] = attrs.field(default=(), converter=_tuple("filters"))
    #: options passed to the source when opening the base / the modified artifact
    base_options: Mapping[str, Any] = attrs.field(factory=dict, validator=_options("base_options"))
    modified_options: Mapping[str, Any] = attrs.field(factory=dict, validator=_options("modified_options"))
    #: the side files of the base / the modified artifact, by name (``{"ram": Path(...)}``)
    base_sides: Mapping[str, Path] = attrs.field(factory=dict, converter=_sides("base_sides"))
    modified_sides: Mapping[str, Path] = attrs.field(factory=dict, converter=_sides("modified_sides"))

    def __attrs_post_init__(self) -> None:
        for f in self.filters:
            if not isinstance(f, FilterSpec):
                raise ConfigError(f"a filter must be a FilterSpec, not {_describe(f)}")

    def input_checks(self) -> list[tuple[Path, str]]:
        """Every file this pair reads, with what it is to the user (for :func:`check_input`)."""
        checks = [(self.base, f"base {self.kind}"), (self.modified, f"modified {self.kind}")]
        checks += [(path, f"base {self.kind} side file {name}:") for name, path in self.base_sides.items()]
        checks += [(path, f"modified {self.kind} side file {name}:") for name, path in self.modified_sides.items()]
        return checks + [(f.input, f"filter {f.name!r}: input") for f in self.filters if f.input is not None]

    def open_options(self, which: Literal["base", "modified"]) -> dict[str, Any]:
        """What the source's ``open`` gets for one artifact: its options and its side files."""
        options, sides = (
            (self.base_options, self.base_sides) if which == "base" else (self.modified_options, self.modified_sides)
        )
        return {**options, **{name: str(path) for name, path in sides.items()}}

    def input_paths(self) -> list[Path]:
        """Every file this pair reads: an output may be none of them."""
        return [path for path, _ in self.input_checks()]


@attrs.frozen
class CreateConfig:
    """Everything ``create`` needs."""

    output: Path = attrs.field(converter=_paths)
    images: tuple[ImageSpec, ...] = attrs.field(converter=_tuple("images"))
    unit_size: int = attrs.field(default=DEFAULT_UNIT, validator=_integer("unit size", MIN_UNIT, MAX_UNIT))
    codec: str = attrs.field(default=DEFAULT_CODEC, validator=_name("a codec name"))
    #: checked against the codec's own range by :func:`check_codec_level` once the codec is known
    #: or :data:`MAX_LEVEL`, resolved by :func:`size_mode`
    level: int | str | None = attrs.field(default=None, validator=_level)
    frame_size: int = attrs.field(default=DEFAULT_FRAME, validator=_integer("frame size", MIN_FRAME, MAX_FRAME))
    threads: int = attrs.field(factory=default_threads, validator=_integer("threads", 1, MAX_THREADS))
    cache_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(_paths))
    #: per encoder name, the options its ``configure`` takes (``{"xdelta3": {"level": 9}}``)
    encoder_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self.images:
            raise ConfigError("nothing to do: give at least one --memory or --disk pair")
        for image in self.images:
            if not isinstance(image, ImageSpec):
                raise ConfigError(f"an image must be an ImageSpec, not {_describe(image)}")
        if sum(1 for image in self.images if image.kind == "memory") > 1:
            raise ConfigError("a VM has one memory image; give --memory once")
        if self.unit_size % 512:
            raise ConfigError(f"unit size {self.unit_size} must be a multiple of 512")
        if not isinstance(self.encoder_options, Mapping):
            raise ConfigError(f"encoder_options must map names to options, not {_describe(self.encoder_options)}")
        for name, options in self.encoder_options.items():
            _check_name(name, "an encoder name in encoder_options")
            check_option_values(options, f"encoder_options.{name}")


@attrs.frozen
class ApplyImageSpec:
    """One base artifact and where its rebuilt counterpart goes."""

    kind: Literal["memory", "disk"] = attrs.field(validator=_one_of("image kind", KINDS))
    base: Path = attrs.field(converter=_paths)
    output: Path = attrs.field(converter=_paths)
    output_format: str | None = attrs.field(default=None, validator=_name("an output format", optional=True))
    base_options: Mapping[str, Any] = attrs.field(factory=dict, validator=_options("base_options"))
    output_options: Mapping[str, Any] = attrs.field(factory=dict, validator=_options("output_options"))
    #: the base artifact's side files, and where the rebuilt artifact's go, by name
    base_sides: Mapping[str, Path] = attrs.field(factory=dict, converter=_sides("base_sides"))
    output_sides: Mapping[str, Path] = attrs.field(factory=dict, converter=_sides("output_sides"))

    def input_checks(self) -> list[tuple[Path, str]]:
        """Every file this image reads, with what it is to the user (for :func:`check_input`)."""
        return [(self.base, "base")] + [(path, f"base side file {name}:") for name, path in self.base_sides.items()]

    def open_options(self) -> dict[str, Any]:
        """What the source's ``open`` gets for the base: its options and its side files."""
        return {**self.base_options, **{name: str(path) for name, path in self.base_sides.items()}}


@attrs.frozen
class ApplyConfig:
    """Everything ``apply`` needs."""

    overlay: Path = attrs.field(converter=_paths)
    images: tuple[ApplyImageSpec, ...] = attrs.field(converter=_tuple("images"))
    strict: bool = attrs.field(default=False, validator=_boolean)
    threads: int = attrs.field(factory=default_threads, validator=_integer("threads", 1, MAX_THREADS))
    cache_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(_paths))

    def __attrs_post_init__(self) -> None:
        for image in self.images:
            if not isinstance(image, ApplyImageSpec):
                raise ConfigError(f"an image must be an ApplyImageSpec, not {_describe(image)}")

    def input_paths(self) -> list[Path]:
        """Every file ``apply`` reads: an output may be none of them."""
        return [self.overlay] + [path for spec in self.images for path, _ in spec.input_checks()]


# --------------------------------------------------------------------------------------------
# checks against the components a config names, once they are known
# --------------------------------------------------------------------------------------------


def size_mode(config: CreateConfig, codec: Codec) -> CreateConfig:
    """``config`` with its :data:`MAX_LEVEL` made concrete: the smallest overlay the codec makes.

    A codec that names a size mode of its own (``size_mode = (codec, level)``: ``zstd`` names
    ``zstd-base``, which compresses each frame against the base) is replaced by it; the images
    whose encoders were left to the defaults store their units raw for it to find in the base,
    and a frame size left at its default becomes :data:`SIZE_MODE_FRAME`. Any other codec runs
    at the highest level it takes.

    :raises ConfigError: the codec has no levels.
    """
    if config.level != MAX_LEVEL:
        return config
    mode = getattr(codec, "size_mode", None)
    if mode is not None:
        name, level = mode
        images = tuple(
            attrs.evolve(spec, encoders=("raw",), policy="fixed") if spec.encoders is None else spec
            for spec in config.images
        )
        frame = SIZE_MODE_FRAME if config.frame_size == DEFAULT_FRAME else config.frame_size
        return attrs.evolve(config, codec=name, level=level, images=images, frame_size=frame)
    bounds = getattr(codec, "level_range", None)
    if bounds is None:
        raise ConfigError(
            f"codec {getattr(codec, 'name', '?')!r} has no levels; --level {MAX_LEVEL} needs one that has"
        )
    return attrs.evolve(config, level=bounds[1])


def check_codec_level(codec: Codec, level: int | None) -> None:
    """Refuse a level the codec does not take, before any work starts, so that ``compress`` only
    ever sees ``None`` or a level in the codec's declared ``level_range``.

    :raises ConfigError: the level is outside the range, or the codec has no levels.
    :raises PluginError: the codec declares a range that is not two ints, lowest first.
    """
    name = getattr(codec, "name", "?")
    bounds = getattr(codec, "level_range", None)
    if bounds is not None and not (
        isinstance(bounds, tuple)
        and len(bounds) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        and bounds[0] <= bounds[1]
    ):
        raise PluginError(f"codec {name!r} declares level_range {bounds!r}; it must be (lowest, highest)")
    if level is None:
        return
    if bounds is None:
        raise ConfigError(f"codec {name!r} has no levels; leave the level out (got {level})")
    low, high = bounds
    if not low <= level <= high:
        raise ConfigError(f"codec {name!r} takes levels {low} to {high}; {level} is outside them")


def check_filter_options(filter_component: Filter, options: Mapping[str, Any]) -> None:
    """Refuse option names the filter does not declare in ``option_names`` (a misspelt option
    would otherwise be ignored without a word). The filter still checks the values.

    :raises ConfigError: naming the unknown options and the ones the filter takes.
    """
    _check_names(f"filter {getattr(filter_component, 'name', '?')!r}", filter_component, options)


def check_source_options(source_component: Source, options: Mapping[str, Any], where: str) -> None:
    """Refuse option names the source does not declare in ``option_names``, before anything is
    opened.

    :param where: which options these are, for the message (``"base_options of disk0"``).
    :raises ConfigError: naming the unknown options and the ones the source takes.
    """
    _check_names(f"{where}: source {getattr(source_component, 'name', '?')!r}", source_component, options)


def check_side_files(source_component: Source, sides: Mapping[str, Path], where: str) -> None:
    """Refuse side files the source does not declare in ``side_files``, before anything is opened.

    :param where: which side files these are, for the message (``"base_sides of base.mem"``).
    :raises ConfigError: naming the unknown side files and the ones the source has.
    """
    known = sorted(side.name for side in getattr(source_component, "side_files", ()))
    unknown = sorted(name for name in sides if name not in known)
    if unknown:
        has = f"it has: {', '.join(known)}" if known else "it has none"
        name = getattr(source_component, "name", "?")
        raise ConfigError(f"{where}: source {name!r} has no side file {', '.join(map(repr, unknown))}; {has}")


def _check_names(what: str, component: Any, options: Mapping[str, Any]) -> None:
    known = frozenset(getattr(component, "option_names", ()))
    unknown = sorted(str(key) for key in options if key not in known)
    if unknown:
        takes = f"it takes: {', '.join(sorted(known))}" if known else "it takes no options"
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{what} has no option{plural} {', '.join(map(repr, unknown))}; {takes}")


# --------------------------------------------------------------------------------------------
# TOML pipelines
# --------------------------------------------------------------------------------------------


def pipeline_schema() -> dict[str, Any]:
    text = resources.files("vmdelta_core").joinpath("schemas/pipeline.schema.json").read_text()
    return json.loads(text)


def _pipeline_validator(jsonschema: Any) -> Any:
    """The schema's validator, except that an integer is an int: JSON Schema counts ``4096.0`` as
    an integer, but the pipeline's integers are sizes and counts, and TOML tells the two apart."""
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(base, type_checker=checker)(pipeline_schema())


#: a pipeline is a few lines; a file beyond this is a mistake, not a pipeline
MAX_PIPELINE_BYTES = 16 << 20


def load_pipeline(path: Path) -> CreateConfig:
    """Read and validate a TOML pipeline; relative paths are relative to the file's folder."""
    path = Path(path)
    check_input(path, "pipeline")  # a FIFO would block for ever
    if path.stat().st_size > MAX_PIPELINE_BYTES:
        raise ConfigError(f"pipeline {path} is larger than {MAX_PIPELINE_BYTES >> 20} MiB; no pipeline needs that")
    try:
        data = _parse_toml(path.read_text(), str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_mapping(data, folder=path.parent, origin=str(path))


def config_from_mapping(data: Mapping[str, Any], *, folder: Path, origin: str = "pipeline") -> CreateConfig:
    """A :class:`CreateConfig` from a pipeline's data, checked against the schema first.

    :raises ConfigError: naming the first field at fault.
    """
    import jsonschema  # only pipelines from files need it; keep the command line quick to start

    # bounded before the schema walks it: jsonschema recurses once per level, and so do messages
    problem = find_problem(data, max_depth=MAX_PIPELINE_DEPTH, scalars=None)
    if problem is not None:
        raise ConfigError(f"{origin}: {path_text(problem[0], slashes=True) or 'top level'} {problem[1]}")
    validator = _pipeline_validator(jsonschema)
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        first = errors[0]
        where = path_text(tuple(first.absolute_path), slashes=True) or "top level"
        message = first.message if len(first.message) <= 200 else first.message[:200] + "..."
        raise ConfigError(f"{origin}: {where}: {message}")

    try:
        return _config_from_valid(data, folder)
    except ConfigError as exc:  # a value the schema cannot judge (a path, an option's type)
        raise ConfigError(f"{origin}: {exc}") from None


def _config_from_valid(data: Mapping[str, Any], folder: Path) -> CreateConfig:
    def resolve(value: str) -> Path:
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # ~user of no such user
            raise ConfigError(f"cannot expand {value!r}: no such user") from None
        return p if p.is_absolute() else folder / p

    def resolve_sides(sides: Mapping[str, str]) -> dict[str, Path]:
        # side files are paths relative to the pipeline too
        return {name: resolve(path) for name, path in sides.items()}

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
                base_options=entry.get("base_options", {}),
                modified_options=entry.get("modified_options", {}),
                base_sides=resolve_sides(entry.get("base_sides", {})),
                modified_sides=resolve_sides(entry.get("modified_sides", {})),
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


def recorded_name(path: Path) -> str:
    """A file's name as an overlay records it: UTF-8 text, with the bytes of a name that is not
    valid UTF-8 (Linux allows any) escaped as ``\\xff`` instead of failing the whole create when
    the metadata is encoded."""
    return os.fsencode(Path(path).name).decode("utf-8", "backslashreplace")


def describe_config(config: CreateConfig) -> Settings:
    """The settings recorded in an overlay: what was asked, without the creator's folders."""
    return Settings(
        unit_size=config.unit_size,
        codec=config.codec,
        level=config.level,
        frame_size=config.frame_size,
        encoder_options={name: dict(options) for name, options in config.encoder_options.items()},
        images=[
            {
                "kind": image.kind,
                "base": recorded_name(image.base),
                "modified": recorded_name(image.modified),
                "format": image.format,
                "encoders": list(image.encoders) if image.encoders is not None else "default",
                "policy": image.policy or "default",
                "filters": [
                    {"name": f.name, "input": recorded_name(f.input) if f.input else None, "options": dict(f.options)}
                    for f in image.filters
                ],
            }
            for image in config.images
        ],
    )
