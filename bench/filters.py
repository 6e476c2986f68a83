#!/usr/bin/env python3
"""Filters on the real captures: how many changed units each drops, and the overlay size with it.

Run directly (not a test): ``python bench/filters.py [--fixtures DIR] [--no-overlays]``. Needs
vmdelta-core and the three filter plugins (``vmdelta-filter-trim``, ``-xray``, ``-freepfn``)
installed; with ``vmdelta-source-qemu`` installed it also measures the QEMU 7.2 migration stream
of the primary capture. It prints Markdown tables:

1. per image and filter: changed units (the candidates), units dropped, share, seconds of the
   ``select`` call (one call per image, as the core makes it);
2. overlays written by ``vmdelta_core.api.create_overlay`` (raw encoder, zstd frames: the
   defaults) with each filter off and on, and the whole VM with every filter off and on.

Memory images are the raw ``pc.ram`` files of ``variants/qemu-7.2-ignore-shared`` with their own
``free-pfns-B.txt``; disks are the primary's ``base.img``/``modified.img`` (trimmed blocks read
as zero) and ``variants/discard-ignore`` (trimmed blocks keep stale data).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmdelta_core.components import FilterContext, SourceImage
from vmdelta_core.registry import Registry, default_registry

UNIT = 4096


def changed_units(base: np.ndarray, modified: np.ndarray) -> np.ndarray:
    """Changed 4 KiB units, compared in 64 MiB slices to keep memory flat."""
    n = modified.size // UNIT
    out = []
    step = (64 << 20) // UNIT
    for start in range(0, n, step):
        stop = min(n, start + step)
        b = base[start * UNIT : stop * UNIT].reshape(-1, UNIT)
        m = modified[start * UNIT : stop * UNIT].reshape(-1, UNIT)
        out.append(np.flatnonzero((b != m).any(axis=1)) + start)
    return np.concatenate(out).astype(np.int64)


def open_image(source: str, path: Path, kind: str, options: dict[str, Any] | None = None) -> SourceImage:
    return default_registry().source(source).open(path, kind=kind, options=options or {})  # type: ignore[arg-type]


def drop_rows(fx: Path, qemu: bool) -> list[list[str]]:
    registry = default_registry()
    rows: list[list[str]] = []
    disk_sets = [("disk (primary, discard=unmap)", fx), ("disk (discard-ignore)", fx / "variants" / "discard-ignore")]
    for label, folder in disk_sets:
        base = open_image("file", folder / "base.img", "disk")
        modified = open_image("file", folder / "modified.img", "disk")
        changed = changed_units(base.data, modified.data)
        runs: list[tuple[str, list[tuple[str, Path | None]]]] = [
            ("trim (trim-trace.log)", [("trim", folder / "trim-trace.log")]),
            ("trim (trace-full.log)", [("trim", folder / "trace-full.log")]),
            ("xray", [("xray", None)]),
            ("trim then xray", [("trim", folder / "trim-trace.log"), ("xray", None)]),
        ]
        for name, chain in runs:
            rows.append(_chain(registry, label, name, chain, base, modified, changed))
    ram = fx / "variants" / "qemu-7.2-ignore-shared"
    layout = {"blocks": [{"name": "pc.ram", "offset": 0, "length": 128 << 20, "guest_address": 0}]}
    base = open_image("file", ram / "base-ram.raw", "memory")
    modified = open_image("file", ram / "modified-ram.raw", "memory")
    base.layout, modified.layout = layout, layout
    changed = changed_units(base.data, modified.data)
    rows.append(
        _chain(
            registry,
            "memory (7.2 raw pc.ram)",
            "freepfn",
            [("freepfn", ram / "free-pfns-B.txt")],
            base,
            modified,
            changed,
        )
    )
    if qemu:
        base = open_image("qemu", fx / "base.mem", "memory")
        modified = open_image("qemu", fx / "modified.mem", "memory")
        changed = changed_units(base.data, modified.data)
        rows.append(
            _chain(
                registry,
                "memory (7.2 stream)",
                "freepfn",
                [("freepfn", fx / "free-pfns-B.txt")],
                base,
                modified,
                changed,
            )
        )
    return rows


def _chain(
    registry: Registry,
    label: str,
    name: str,
    chain: Sequence[tuple[str, Path | None]],
    base: SourceImage,
    modified: SourceImage,
    changed: np.ndarray,
) -> list[str]:
    """Run ``chain`` the way the core does: each filter sees what the previous one kept."""
    kept = changed
    started = time.perf_counter()
    for filter_name, path in chain:
        context = FilterContext("image", modified.kind, UNIT, base, modified, path, {})
        result = registry.filter(filter_name).select(context, kept)
        kept = kept[~np.asarray(result.drop)]
    seconds = time.perf_counter() - started
    dropped = changed.size - kept.size
    share = f"{100 * dropped / changed.size:.1f} %" if changed.size else "-"
    return [label, name, str(changed.size), str(dropped), share, f"{seconds:.3f}"]


def overlay_rows(fx: Path, qemu: bool) -> list[list[str]]:
    from vmdelta_core.api import CreateConfig, FilterSpec, ImageSpec, create_overlay

    ram = fx / "variants" / "qemu-7.2-ignore-shared"
    disk = ("disk", fx / "base.img", fx / "modified.img", "file")
    memory = ("memory", ram / "base-ram.raw", ram / "modified-ram.raw", "file")
    trim = FilterSpec("trim", fx / "trim-trace.log")
    xray = FilterSpec("xray")
    free_raw = FilterSpec("freepfn", ram / "free-pfns-B.txt")
    cases: list[tuple[str, list[tuple[tuple[Any, ...], list[FilterSpec]]]]] = [
        ("disk: no filter", [(disk, [])]),
        ("disk: trim", [(disk, [trim])]),
        ("disk: xray", [(disk, [xray])]),
        ("disk: trim + xray", [(disk, [trim, xray])]),
        ("memory (raw pc.ram): no filter", [(memory, [])]),
        ("memory (raw pc.ram): freepfn", [(memory, [free_raw])]),
        ("VM (raw pc.ram + disk): no filter", [(memory, []), (disk, [])]),
        ("VM (raw pc.ram + disk): all filters", [(memory, [free_raw]), (disk, [trim, xray])]),
    ]
    if qemu:
        stream = ("memory", fx / "base.mem", fx / "modified.mem", None)
        free = FilterSpec("freepfn", fx / "free-pfns-B.txt")
        cases += [
            ("memory (7.2 stream): no filter", [(stream, [])]),
            ("memory (7.2 stream): freepfn", [(stream, [free])]),
            ("VM (stream + disk): no filter", [(stream, []), (disk, [])]),
            ("VM (stream + disk): all filters", [(stream, [free]), (disk, [trim, xray])]),
        ]
    rows: list[list[str]] = []
    reference: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, images in cases:
            specs = [
                ImageSpec(kind, base, modified, format=fmt, filters=filters)
                for (kind, base, modified, fmt), filters in images
            ]
            output = Path(tmp) / "bench.overlay"
            report = create_overlay(CreateConfig(output=output, images=tuple(specs), cache_dir=Path(tmp) / "cache"))
            dropped = sum(f.dropped for image in report.metadata.images for f in image.filters)
            group = label.split(":")[0]
            reference.setdefault(group, report.size)
            ratio = report.size / reference[group]
            rows.append([label, str(dropped), f"{report.size:,}", f"{ratio:.3f}", f"{report.seconds:.2f}"])
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, help="the unpacked realistic-128 set (default: real_fixtures())")
    parser.add_argument("--no-overlays", action="store_true", help="only the drop counts")
    args = parser.parse_args(argv)
    fx = args.fixtures
    if fx is None:
        from vmdelta_core.testing import real_fixtures

        fx = real_fixtures()
    if fx is None or not (fx / "modified.img").is_file():
        print("bench/filters.py: the realistic-128 fixtures are not available", file=sys.stderr)
        return 2
    names = default_registry().names("filter")
    missing = [n for n in ("trim", "xray", "freepfn") if n not in names]
    if missing:
        print(f"bench/filters.py: install the filter plugins first (missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    qemu = "qemu" in default_registry().names("source")
    print(f"## Filters on {fx.name} (4 KiB units)\n")
    print(table(["image", "filter", "changed units", "dropped", "share", "select s"], drop_rows(fx, qemu)))
    if not args.no_overlays:
        print("\n## Overlay size with filters off and on (raw encoder, zstd frames)\n")
        print(table(["overlay", "units dropped", "bytes", "vs. no filter", "create s"], overlay_rows(fx, qemu)))
    if not qemu:
        print("\n(vmdelta-source-qemu is not installed: the migration-stream rows are left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
