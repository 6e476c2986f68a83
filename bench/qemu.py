#!/usr/bin/env python3
"""QEMU memory snapshots: how fast the ``qemu`` source reads and writes them, and what an overlay
costs against the tools a user would otherwise pick.

Run directly (not a test): ``python bench/qemu.py [--fixtures DIR] [--only NAME] [--no-tools]``.
Needs vmdelta-core and vmdelta-source-qemu installed; the comparisons need the ``zstd`` and
``xdelta3`` commands. For every capture pair of the real fixture set it prints, as Markdown:

1. parse: MB/s of artifact read by ``QemuSource.open`` (stream, mapped-ram file, or stream + RAM
   file for x-ignore-shared), best of ``--repeat`` runs, page cache warm;
2. materialize: MB/s of artifact written by ``QemuSource.materialize`` from the rebuilt image;
3. the memory-only overlay from ``vmdelta_core.api.create_overlay`` (the core's default encoders,
   or ``--encoders``; ``--freepfn`` adds the free-page filter with the capture's exact free list),
   its size and create/apply seconds (apply verified byte for byte without the filter), against ``zstd -19 --long=31
   --patch-from`` and ``xdelta3 -9`` on the same pair of files (for x-ignore-shared the stream
   and the RAM file are two pairs; their sizes and times are added).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from vmdelta_source_qemu import QemuSource

from vmdelta_core.components import RebuiltImage
from vmdelta_core.testing import real_fixtures

CAPTURES = {
    "7.2 stream": "",
    "10.0 stream": "variants/qemu-10.0-stream",
    "10.0 mapped-ram": "variants/qemu-10.0-mapped-ram",
    "7.2 x-ignore-shared": "variants/qemu-7.2-ignore-shared",
    "10.0 x-ignore-shared": "variants/qemu-10.0-ignore-shared",
}
MB = 1e6


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def pair_files(folder: Path) -> list[tuple[Path, Path]]:
    pairs = [(folder / "base.mem", folder / "modified.mem")]
    if (folder / "base-ram.raw").exists():
        pairs.append((folder / "base-ram.raw", folder / "modified-ram.raw"))
    return pairs


def source_speed(folder: Path, scratch: Path, repeat: int) -> tuple[float, float]:
    """(parse MB/s, materialize MB/s) for the modified snapshot."""
    source = QemuSource()
    mem = folder / "modified.mem"
    ram = folder / "modified-ram.raw"
    options = {"ram": str(ram)} if ram.exists() else {}
    size = mem.stat().st_size + (ram.stat().st_size if ram.exists() else 0)

    def parse() -> None:
        source.open(mem, kind="memory", options=options).close()

    parse_s = best(parse, repeat)
    image = source.open(mem, kind="memory", options=options)
    raw = scratch / "image.raw"
    raw.write_bytes(image.data.tobytes())
    out_options = {"ram_output": str(scratch / "out-ram.raw")} if ram.exists() else {}
    rebuilt = RebuiltImage(
        path=raw,
        size=image.size,
        unit_size=4096,
        envelope=image.envelope,
        layout=image.layout,
        changed=np.zeros(0, np.int64),
        base=image,
        base_path=mem,
        options=out_options,
    )

    def materialize() -> None:
        out = scratch / "out.mem"
        out.unlink(missing_ok=True)
        source.materialize(rebuilt, out)

    write_s = best(materialize, repeat)
    assert (scratch / "out.mem").read_bytes() == mem.read_bytes(), "materialized stream differs"
    image.close()
    return size / parse_s / MB, size / write_s / MB


def overlay(folder: Path, scratch: Path, encoders: tuple[str, ...] | None, freepfn: bool) -> tuple[int, float, float]:
    from vmdelta_core.api import (
        ApplyConfig,
        ApplyImageSpec,
        CreateConfig,
        FilterSpec,
        ImageSpec,
        apply_overlay,
        create_overlay,
    )

    shared = (folder / "base-ram.raw").exists()
    base_opts = {"ram": str(folder / "base-ram.raw")} if shared else {}
    mod_opts = {"ram": str(folder / "modified-ram.raw")} if shared else {}
    out = scratch / "memory.vmdo"
    extra: dict[str, Any] = {}
    if encoders:
        extra["encoders"] = encoders
    if freepfn:
        extra["filters"] = (FilterSpec("freepfn", folder / "free-pfns-B.txt"),)
    spec = ImageSpec(
        "memory",
        folder / "base.mem",
        folder / "modified.mem",
        base_options=base_opts,
        modified_options=mod_opts,
        **extra,
    )
    started = time.perf_counter()
    create_overlay(CreateConfig(out, [spec], threads=2, cache_dir=scratch / "cache"))
    created = time.perf_counter() - started
    rebuilt, rebuilt_ram = scratch / "rebuilt.mem", scratch / "rebuilt-ram.raw"
    started = time.perf_counter()
    apply_overlay(
        ApplyConfig(
            out,
            [
                ApplyImageSpec(
                    "memory",
                    folder / "base.mem",
                    rebuilt,
                    base_options=base_opts,
                    output_options={"ram_output": str(rebuilt_ram)} if shared else {},
                )
            ],
            threads=2,
            cache_dir=scratch / "cache",
        )
    )
    applied = time.perf_counter() - started
    if freepfn:  # dropped free pages come back from the base: compare the pages in use only
        return out.stat().st_size, created, applied
    assert rebuilt.read_bytes() == (folder / "modified.mem").read_bytes(), "rebuilt stream differs"
    if shared:
        assert rebuilt_ram.read_bytes() == (folder / "modified-ram.raw").read_bytes(), "rebuilt RAM differs"
    return out.stat().st_size, created, applied


def tool(folder: Path, scratch: Path, make: Callable[[Path, Path, Path], list[str]]) -> tuple[int, float]:
    size, seconds = 0, 0.0
    for base, modified in pair_files(folder):
        out = scratch / "patch"
        out.unlink(missing_ok=True)
        started = time.perf_counter()
        subprocess.run(make(base, modified, out), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds += time.perf_counter() - started
        size += out.stat().st_size
    return size, seconds


def zstd_cmd(base: Path, modified: Path, out: Path) -> list[str]:
    return ["zstd", "-q", "-19", "--long=31", "-T1", f"--patch-from={base}", str(modified), "-o", str(out)]


def xdelta_cmd(base: Path, modified: Path, out: Path) -> list[str]:
    window = 1 << max(24, (max(base.stat().st_size, modified.stat().st_size) - 1).bit_length())
    return ["xdelta3", "-e", "-9", "-f", "-B", str(min(window, 1 << 30)), "-s", str(base), str(modified), str(out)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, help="the realistic-128 set (default: unpack shared/fixtures)")
    parser.add_argument("--only", action="append", help="capture name to run (repeatable), e.g. '7.2 stream'")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-tools", action="store_true", help="skip zstd and xdelta3")
    parser.add_argument("--encoders", help="comma-separated encoders for the overlay (default: the core's)")
    parser.add_argument("--freepfn", action="store_true", help="drop free guest pages (vmdelta-filter-freepfn)")
    args = parser.parse_args()
    root = args.fixtures or real_fixtures()
    if root is None:
        print("no fixtures: pass --fixtures DIR", file=sys.stderr)
        return 2
    tools = not args.no_tools and shutil.which("zstd") and shutil.which("xdelta3")
    print(
        "| capture | artifact MB | parse MB/s | materialize MB/s | overlay MB | create s | apply s |"
        + (" zstd --patch-from MB | s | xdelta3 MB | s |" if tools else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|---|---|" if tools else ""))
    for name, sub in CAPTURES.items():
        if args.only and name not in args.only:
            continue
        folder = root / sub
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            scratch = Path(tmp)
            artifact = sum(m.stat().st_size for _, m in pair_files(folder))
            parse, write = source_speed(folder, scratch, args.repeat)
            encoders = tuple(args.encoders.split(",")) if args.encoders else None
            size, created, applied = overlay(folder, scratch, encoders, args.freepfn)
            row = (
                f"| {name} | {artifact / MB:.1f} | {parse:.0f} | {write:.0f} | {size / MB:.2f} | "
                f"{created:.2f} | {applied:.2f} |"
            )
            if tools:
                zsize, zsec = tool(folder, scratch, zstd_cmd)
                xsize, xsec = tool(folder, scratch, xdelta_cmd)
                row += f" {zsize / MB:.2f} | {zsec:.1f} | {xsize / MB:.2f} | {xsec:.1f} |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
