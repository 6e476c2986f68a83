"""The subcommands: turn flags into a config, call the API, show the report."""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from vmdelta_core.cli.output import (
    MissingComponent,
    console,
    err_console,
    plugins_table,
    print_json,
    progress_for,
    render_overlay,
)
from vmdelta_core.cli.stdio import binary_stdin, binary_stdout
from vmdelta_core.config import (
    DEFAULT_ENCODERS,
    DEFAULT_POLICY,
    ApplyConfig,
    ApplyImageSpec,
    CreateConfig,
    ImageSpec,
    load_pipeline,
    parse_filter,
    parse_option,
)
from vmdelta_core.errors import ConfigError, StorageError
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.metadata import OverlayMetadata
from vmdelta_core.plugins import DISABLE_VARIABLE, core_version
from vmdelta_core.records import ApplyReport, CreateReport, RebuiltReport
from vmdelta_core.registry import Registry, default_registry

__all__ = [
    "apply",
    "convert",
    "create",
    "demo",
    "index",
    "inspect",
    "missing_components",
    "plugin_rows",
    "plugins",
    "run",
    "serve",
    "version",
]


def version() -> str:
    return core_version()


def _threads(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "threads", None):
        out["threads"] = args.threads
    if getattr(args, "cache_dir", None):
        out["cache_dir"] = Path(args.cache_dir)
    return out


def create_config_from_args(args: argparse.Namespace) -> CreateConfig:
    """The same :class:`CreateConfig` a TOML pipeline would build."""
    encoders = tuple(e.strip() for e in args.encoder.split(",") if e.strip()) if args.encoder else DEFAULT_ENCODERS
    policy = args.policy or DEFAULT_POLICY
    filter_options: dict[str, dict[str, Any]] = {}
    for text in args.filter_option:
        name, key, value = parse_option(text, "--filter-option")
        filter_options.setdefault(name, {})[key] = value
    filters = [attrs.evolve(f, options=filter_options.get(f.name, {})) for f in map(parse_filter, args.filter)]
    stray = set(filter_options) - {f.name for f in filters}
    if stray:
        raise ConfigError(f"--filter-option for {sorted(stray)[0]!r}, which no --filter turns on")
    encoder_options: dict[str, dict[str, Any]] = {}
    for text in args.encoder_option:
        name, key, value = parse_option(text, "--encoder-option")
        encoder_options.setdefault(name, {})[key] = value
    images: list[ImageSpec] = []
    base_sides, modified_sides = _memory_sides(args)
    if args.memory:
        images.append(
            ImageSpec(
                "memory",
                args.memory[0],
                args.memory[1],
                format=args.memory_format,
                encoders=encoders,
                policy=policy,
                filters=[f for f in filters if _applies(f.name, "memory")],
                base_sides=base_sides,
                modified_sides=modified_sides,
            )
        )
    for base, modified in args.disk:
        images.append(
            ImageSpec(
                "disk",
                base,
                modified,
                format=args.disk_format,
                encoders=encoders,
                policy=policy,
                filters=[f for f in filters if _applies(f.name, "disk")],
            )
        )
    used = {f.name for image in images for f in image.filters}
    unused = [f.name for f in filters if f.name not in used]
    if unused:
        raise ConfigError(f"filter {unused[0]!r} applies to none of the images given")
    return CreateConfig(
        output=Path(args.output),
        images=tuple(images),
        unit_size=args.unit_size,
        codec=args.codec,
        level=args.level,
        frame_size=args.frame_size,
        encoder_options=encoder_options,
        **_threads(args),
    )


def _memory_sides(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Path]]:
    """The memory artifacts' side files: ``--memory-side NAME BASE OTHER``, and ``--memory-ram``
    (the ``ram`` side file of an x-ignore-shared QEMU snapshot)."""
    given = [*(args.memory_side or ()), *((["ram", *args.memory_ram],) if args.memory_ram else ())]
    if given and not args.memory:
        flag = "--memory-ram" if args.memory_ram else "--memory-side"
        raise ConfigError(f"{flag} needs --memory (the artifacts the side files belong to)")
    base: dict[str, Path] = {}
    other: dict[str, Path] = {}
    for name, first, second in given:
        if name in base:
            raise ConfigError(f"side file {name!r} given twice (--memory-ram is side file 'ram')")
        base[name], other[name] = Path(first), Path(second)
    return base, other


def _applies(name: str, kind: str) -> bool:
    return kind in default_registry().filter(name).kinds


def _show_create(report: CreateReport, args: argparse.Namespace, *, to_stderr: bool = False) -> None:
    if args.json:
        print_json(
            {
                "output": str(report.output),
                "size": report.size,
                "seconds": round(report.seconds, 3),
                "images": [image.to_json() for image in report.images],
            },
            stderr=to_stderr,
        )
    elif not args.quiet:
        out = err_console if to_stderr else console
        render_overlay(report.metadata, size=report.size, to=out)
        where = "the overlay to standard output" if to_stderr else report.output
        out.print(f"wrote {where} ({report.size} bytes) in {report.seconds:.2f} s")


def create(args: argparse.Namespace) -> int:
    from vmdelta_core.create import create_overlay  # the pipelines are loaded by the command that runs them

    config = create_config_from_args(args)
    to_stdout = args.output == "-"
    stream = binary_stdout("the overlay") if to_stdout else None
    if to_stdout:
        config = attrs.evolve(config, output=Path("standard output"))
    with progress_for(args.quiet or args.json) as progress:
        report = create_overlay(config, progress=progress, stream=stream)
    _show_create(report, args, to_stderr=to_stdout)
    return 0


def run(args: argparse.Namespace) -> int:
    from vmdelta_core.create import create_overlay

    pipeline = Path(args.pipeline)
    config = load_pipeline(pipeline)
    config = attrs.evolve(config, **_threads(args))
    OutputSet([pipeline]).check(config.output)  # the pipeline is an input too
    with progress_for(args.quiet or args.json) as progress:
        report = create_overlay(config, progress=progress)
    _show_create(report, args)
    return 0


def _show_apply(report: ApplyReport, args: argparse.Namespace, *, to_stderr: bool = False) -> None:
    if args.json:
        print_json(
            {
                "overlay": str(report.overlay),
                "seconds": round(report.seconds, 3),
                "images": [attrs.asdict(image) for image in report.images],
            },
            stderr=to_stderr,
        )
    elif not args.quiet:
        out = err_console if to_stderr else console
        for image in report.images:
            dropped = sum(image.dropped.values())
            note = f"; {dropped} units rebuilt from the base by filters" if dropped else ""
            where = "standard output" if str(image.output) == "-" else image.output
            out.print(f"{image.name}: wrote {where} ({image.size} bytes), {_verified(image)}{note}")
        out.print(f"applied {report.overlay} in {report.seconds:.2f} s")


def _verified(image: RebuiltReport) -> str:
    """What apply checked of an output, with the digest of exactly that: the artifact file's when
    it is the original byte for byte, else the rebuilt image's."""
    if image.artifact_identical and image.artifact_digest:
        return f"artifact identical to the original ({image.artifact_digest})"
    return f"image verified ({image.digest})"


def apply(args: argparse.Namespace) -> int:
    from vmdelta_core.apply import apply_overlay

    images: list[ApplyImageSpec] = []
    base_sides, output_sides = _memory_sides(args)
    if args.memory:
        images.append(
            ApplyImageSpec("memory", args.memory[0], args.memory[1], base_sides=base_sides, output_sides=output_sides)
        )
    for base, output in args.disk:
        images.append(ApplyImageSpec("disk", base, output, output_format=args.disk_format))
    if not images:
        raise ConfigError("nothing to rebuild: give the --memory and --disk pairs the overlay was made from")
    from_stdin = args.overlay == "-"
    overlay = Path("standard input") if from_stdin else Path(args.overlay)
    fifo = _fifo(images[0].output) if images[0].kind == "memory" else None
    if fifo is not None:  # streamed as to standard output, into the FIFO
        images[0] = attrs.evolve(images[0], output=Path("-"))
    config = ApplyConfig(overlay=overlay, images=tuple(images), strict=args.strict, **_threads(args))
    stream = binary_stdin("the overlay") if from_stdin else None
    to_stdout = fifo is None and any(str(spec.output) == "-" for spec in images)
    with contextlib.ExitStack() as stack:
        stdout = binary_stdout("the rebuilt artifact") if to_stdout else None
        if fifo is not None:
            stdout = stack.enter_context(_open_fifo(fifo))
        with progress_for(args.quiet or args.json) as progress:
            report = apply_overlay(config, progress=progress, stream=stream, stdout=stdout)
    if fifo is not None:
        shown = [attrs.evolve(r, output=fifo) if str(r.output) == "-" else r for r in report.images]
        report = attrs.evolve(report, images=tuple(shown))
    _show_apply(report, args, to_stderr=to_stdout)
    return 0


def _fifo(path: Path) -> Path | None:
    """``path`` when it is an existing FIFO (a named pipe QEMU reads the memory stream from)."""
    try:
        return path if stat.S_ISFIFO(os.stat(path).st_mode) else None
    except OSError:
        return None


@contextlib.contextmanager
def _open_fifo(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for writing; this waits for its reader. Closed on any outcome: a reader
    that got less than the whole stream sees it end early (QEMU's load fails)."""
    try:
        out = open(path, "wb")  # noqa: SIM115 (closed below, on every outcome)
    except OSError as exc:
        raise StorageError(f"cannot open the FIFO {path}: {exc.strerror or exc}") from None
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):  # a reader gone early: the stream was not whole anyway
            out.close()


def inspect(args: argparse.Namespace) -> int:
    from vmdelta_core.api import inspect_overlay

    maps = _draw_map(args) if args.map else None
    if args.overlay == "-":
        data = inspect_overlay(Path("standard input"), stream=binary_stdin("the overlay"))
    else:
        data = inspect_overlay(Path(args.overlay), verify=not args.no_verify)
    meta = OverlayMetadata.from_json(data["metadata"])
    lacking = missing_components(meta, default_registry())
    if args.json:
        print_json(data | {"missing": [attrs.asdict(m) for m in lacking]})
    else:
        render_overlay(meta, size=data["size"], frames=data["frames"] if args.frames else None, missing=lacking)
    if maps is not None and not args.json:
        scale = max((m.per_pixel for m in maps), default=1)
        console.print(f"wrote {args.map}: " + ("a cell per unit" if scale == 1 else f"up to {scale} units a cell"))
    return 0


def _draw_map(args: argparse.Namespace) -> list[Any]:
    """``inspect --map``: the picture, drawn before the report so that a missing Pillow or an
    unreadable frame is the only thing said."""
    from vmdelta_core.cli.overlaymap import write_map

    if args.overlay == "-":
        raise ConfigError("--map reads an overlay file, not standard input: save it first (vmdelta convert - FILE)")
    return write_map(Path(args.overlay), Path(args.map), default_registry())


def missing_components(meta: OverlayMetadata, registry: Registry) -> list[MissingComponent]:
    """The components ``apply`` needs to rebuild ``meta``'s images (its sources, encoders and
    codecs; filters only ran at create) that ``registry`` lacks, each with what gets it."""
    return [
        MissingComponent(c.kind, c.name, c.distribution, c.version, registry.remedy(c.distribution, c.version))
        for c in meta.components
        if c.kind != "filter" and (c.kind, c.name) not in registry
    ]


def convert(args: argparse.Namespace) -> int:
    from vmdelta_core.apply.feed import StreamFeed, open_feed
    from vmdelta_core.overlay.convert import convert_overlay

    from_stdin, to_stdout = args.overlay == "-", args.output == "-"
    source = Path("standard input") if from_stdin else Path(args.overlay)
    feed = open_feed(source, binary_stdin("the overlay") if from_stdin else None)
    try:
        reader = feed.reader
        stream = (args.to == "stream") if args.to else not (isinstance(feed, StreamFeed) or reader.stream_form)
        form = "stream" if stream else "file"
        if to_stdout:
            size = convert_overlay(reader, binary_stdout("the overlay"), stream=stream)
        else:
            with OutputSet([] if from_stdin else [source]) as outputs:
                pending = outputs.add(Path(args.output))
                try:
                    with open(pending.path, "wb") as f:
                        size = convert_overlay(reader, f, stream=stream)
                except OSError as exc:
                    raise outputs.explain(exc, Path(args.output)) from None
                outputs.commit()
    finally:
        feed.close()
    if not args.quiet:
        where = "the overlay to standard output" if to_stdout else args.output
        (err_console if to_stdout else console).print(f"wrote {where} in the {form} form ({size} bytes)")
    return 0


def index(args: argparse.Namespace) -> int:
    from vmdelta_core.baseimage import keep_image, kept_image
    from vmdelta_core.index import load_or_build_index

    registry = default_registry()
    results = []
    with progress_for(args.quiet or args.json) as progress:
        for name in args.bases:
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"{path} does not exist or is not a file")
            source = args.format or registry.detect_source(path, args.kind)
            cache_dir = Path(args.cache_dir) if args.cache_dir else None
            kept = kept_image(path, source, kind=args.kind, options={}, cache_dir=cache_dir)
            with kept or registry.source(source).open(path, kind=args.kind, options={}) as image:
                built, cached = load_or_build_index(
                    path,
                    image,
                    source=source,
                    unit=args.unit_size,
                    options={},
                    cache_dir=cache_dir,
                    progress=progress.start(f"index {path.name}", image.size),
                    beside=args.beside,
                )
                if kept is not None:
                    image_state = "already kept"
                elif image.file is not None:
                    image_state = "the file itself"  # a raw disk: nothing to keep
                elif args.image:
                    keep_image(path, image, source=source, options={}, cache_dir=cache_dir)
                    image_state = "kept"
                else:
                    image_state = "not kept"
            results.append(
                {
                    "base": str(path),
                    "source": source,
                    "size": built.size,
                    "fingerprint": built.fingerprint,
                    "cached": cached,
                    "image": image_state,
                }
            )
    if args.json:
        print_json(results)
    elif not args.quiet:
        for r in results:
            state = "already indexed" if r["cached"] else "indexed"
            image = {"kept": ", image kept", "already kept": ", image already kept"}.get(r["image"], "")
            console.print(f"{r['base']}: {state}{image} ({r['source']}, {r['size']} bytes, {r['fingerprint']})")
    return 0


def plugins(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows = plugin_rows(registry)
    if args.json:
        print_json(rows)
        return 0
    console.print(plugins_table(rows))
    for info in registry:
        for side in getattr(info.component, "side_files", ()) if info.kind == "source" else ():
            console.print(f"source {info.name} reads side file {side.name!r} (--memory-side): {side.description}")
    for name, distribution in sorted(registry.disabled().items()):
        console.print(f"plugin {name} ({distribution}) is installed but disabled by {DISABLE_VARIABLE}")
    return 0


def plugin_rows(registry: Registry) -> list[dict[str, Any]]:
    """One row per component, as ``vmdelta plugins --json`` prints them."""
    return [
        {"component": i.name, "kind": i.kind, "plugin": i.plugin, "distribution": i.distribution, "version": i.version}
        | ({"side_files": [s.name for s in getattr(i.component, "side_files", ())]} if i.kind == "source" else {})
        for i in registry
    ]


def demo(args: argparse.Namespace) -> int:
    from vmdelta_core.cli.demo import run_demo

    return run_demo(Path(args.keep) if args.keep else None, quiet=args.quiet, as_json=args.json, **_threads(args))


def serve(args: argparse.Namespace) -> int:
    import logging

    from vmdelta_core.serve import BaseCatalog, OverlayServer, ServedBase, load_serve_config

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s vmdelta serve: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    bases = [ServedBase("memory", Path(p)) for p in args.memory_base] + [
        ServedBase("disk", Path(p)) for p in args.disk_base
    ]
    config = load_serve_config(
        Path(args.config) if args.config else None,
        listen=args.listen,
        output=Path(args.output) if args.output else None,
        token_file=Path(args.token_file) if args.token_file else None,
        token_env=args.token_env,
        timeout=args.timeout,
        max_connections=args.max_connections,
        threads=args.threads,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        bases=bases,
    )
    registry = default_registry()
    catalog = BaseCatalog.build(config.bases, registry, config.cache_dir)
    server = OverlayServer(config, catalog, registry)
    server.serve_forever()  # until a signal; its finally closes the socket and breaks off clients
    return 0
