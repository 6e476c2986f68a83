#!/usr/bin/env python3
"""Fleets on Dask: ``vmdelta batch`` against itself on fewer workers and against a shell loop.

A fleet of ten VMs made from the realistic fixtures: the six raw disks of ``realistic-128`` and its
variants on one shared base, two copies of its modified disk with different random writes on that
base, and the two x-ignore-shared VMs (raw RAM and disk, each on its own bases): five distinct
bases. Measured in one run, each from an empty index cache:

* ``batch``, 1 worker against 2 workers (local clusters of processes, start-up included);
* a shell loop of ``vmdelta create`` (one process after the other), with the index cache shared
  by the loop and with a fresh cache per VM (a loop spread over machines that share nothing);
* one 4 GiB sparse disk pair (the realistic disks at four offsets), made in 512 MiB shards on 2
  workers against ``vmdelta create`` in one process.

It prints the table for ``bench/REPORT.md`` and the per-task costs ``docs/fleets.md`` scales.

    python bench/batch.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vmdelta_core.api import CreateConfig, Fleet, ImageSpec, VmSpec, batch
from vmdelta_core.batch import load_manifest
from vmdelta_core.fileio import data_extents
from vmdelta_core.testing import real_fixtures

VMDELTA = [sys.executable, "-m", "vmdelta_core"]
MiB = 1 << 20


def copy_with_writes(source: Path, target: Path, seed: int, count: int = 64) -> Path:
    """``source`` copied (sparse) with ``count`` random 64 KiB writes: another tenant's disk."""
    shutil.copyfile(source, target)
    rng = np.random.default_rng(seed)
    size = source.stat().st_size
    with open(target, "r+b") as f:
        for offset in rng.integers(0, size // (64 << 10), count).tolist():
            f.seek(offset * (64 << 10))
            f.write(rng.integers(0, 256, 64 << 10, dtype="uint8").tobytes())
    return target


def fleet(realistic: Path, work: Path) -> list[tuple[str, list[ImageSpec]]]:
    base = realistic / "base.img"
    variants = [
        "discard-ignore",
        "qemu-10.0-stream",
        "qemu-10.0-mapped-ram",
        "qemu-7.2-ignore-shared",
        "qemu-10.0-ignore-shared",
    ]
    vms = [("realistic", [ImageSpec("disk", base, realistic / "modified.img")])]
    vms += [(name, [ImageSpec("disk", base, realistic / "variants" / name / "modified.img")]) for name in variants]
    for seed in (1, 2):
        copy = copy_with_writes(realistic / "modified.img", work / f"tenant-{seed}.img", seed)
        vms.append((f"tenant-{seed}", [ImageSpec("disk", base, copy)]))
    for name in ("qemu-7.2-ignore-shared", "qemu-10.0-ignore-shared"):
        v = realistic / "variants" / name
        images = [
            ImageSpec("memory", v / "base-ram.raw", v / "modified-ram.raw"),
            ImageSpec("disk", v / "base.img", v / "modified.img"),
        ]
        vms.append((f"vm-{name}", images))
    return vms


def as_fleet(vms: list[tuple[str, list[ImageSpec]]], out: Path, cache: Path, **settings: Any) -> Fleet:
    return Fleet(
        [
            VmSpec(name, CreateConfig(output=out / f"{name}.overlay", images=images, cache_dir=cache, threads=1))
            for name, images in vms
        ],
        **settings,
    )


def processor_seconds() -> float:
    """User and system time of this process and of its children that ended (the local cluster's
    workers, the loop's processes): the work, whatever else the machine is doing."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_batch(label: str, fleet_: Fleet, workers: int) -> tuple[float, float, Any]:
    """Wall and processor seconds of ``vmdelta batch``, and its report."""
    started, cpu = time.perf_counter(), processor_seconds()
    report = batch(fleet_, workers=workers)
    seconds, cpu = time.perf_counter() - started, processor_seconds() - cpu
    assert report.succeeded, [vm.error for vm in report.failed]
    busy = sum(vm.seconds for vm in report.vms)
    print(f"  {label}: {seconds:.1f} s (VM tasks {busy:.1f} s, load average {os.getloadavg()[0]:.1f})", flush=True)
    return seconds, cpu, report


def noop(value: int) -> int:
    return value


def scheduler_overhead(tasks: int = 2000) -> float:
    """Seconds per task of Dask itself: trivial tasks through a local cluster of two processes."""
    import logging

    import distributed

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=logging.CRITICAL
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.gather(client.map(noop, range(100)))  # warm
        started = time.perf_counter()
        client.gather(client.map(noop, range(tasks), pure=False))
        return (time.perf_counter() - started) / tasks


def manifest_cost(realistic: Path, work: Path, vms: int = 2000) -> float:
    """Seconds per VM to read and validate a manifest (done once, by the client)."""
    lines = []
    for n in range(vms):
        lines.append(
            f'[[vms]]\nname = "vm{n}"\noverlay = {{ output = "out/vm{n}.overlay" }}\n'
            f'images = [{{ kind = "disk", base = "{realistic / "base.img"}", modified = "{realistic / "modified.img"}",'
            ' filters = ["trim:trace.log"], encoders = ["xdelta3", "raw"] }]\n'
        )
    manifest = work / "big-fleet.toml"
    manifest.write_text("\n".join(lines))
    started = time.perf_counter()
    load_manifest(manifest)
    return (time.perf_counter() - started) / vms


def shell_loop(
    vms: list[tuple[str, list[ImageSpec]]], out: Path, cache: Path, *, shared_cache: bool
) -> tuple[float, float]:
    """Wall and processor seconds of ``vmdelta create`` run for each VM in turn."""
    started, cpu = time.perf_counter(), processor_seconds()
    for number, (name, images) in enumerate(vms):
        argv = [*VMDELTA, "create", "-q", "-o", str(out / f"{name}.overlay")]
        for spec in images:
            argv += [f"--{spec.kind}", str(spec.base), str(spec.modified)]
        argv += ["--cache-dir", str(cache if shared_cache else cache / str(number))]
        subprocess.run(argv, check=True)
    return time.perf_counter() - started, processor_seconds() - cpu


def sparse_pair(realistic: Path, work: Path, size: int = 4 << 30) -> tuple[Path, Path]:
    """A ``size`` sparse disk pair: the realistic base and modified disks at four offsets."""
    out = []
    for name in ("base.img", "modified.img"):
        target = work / f"big-{name}"
        with open(realistic / name, "rb") as src, open(target, "wb") as dst:
            dst.truncate(size)
            for copy in range(4):
                at = copy * (size // 4)
                for start, length in data_extents(realistic / name).tolist():
                    src.seek(start)
                    os.pwrite(dst.fileno(), src.read(length), at + start)
        out.append(target)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    realistic = real_fixtures("realistic-128")
    if realistic is None:
        sys.exit("the real fixtures are not available (VMDELTA_SHARED, zstd)")
    figures: dict[str, Any] = {"load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="vmdelta-bench-batch-") as tmp:
        work = Path(tmp)
        vms = fleet(realistic, work)
        print(f"fleet: {len(vms)} VMs", flush=True)

        def fresh(name: str) -> tuple[Path, Path]:
            out, cache = work / name / "out", work / name / "cache"
            out.mkdir(parents=True)
            return out, cache

        one, one_cpu, report1 = timed_batch("batch, 1 worker", as_fleet(vms, *fresh("w1")), 1)
        two, two_cpu, report2 = timed_batch("batch, 2 workers", as_fleet(vms, *fresh("w2")), 2)
        loop_shared, loop_shared_cpu = shell_loop(vms, *fresh("loop-shared"), shared_cache=True)
        print(f"  shell loop, shared cache: {loop_shared:.1f} s", flush=True)
        loop_fresh, loop_fresh_cpu = shell_loop(vms, *fresh("loop-fresh"), shared_cache=False)
        print(f"  shell loop, fresh cache per VM: {loop_fresh:.1f} s", flush=True)
        figures["fleet"] = {
            "vms": len(vms),
            "bases": len(report2.bases),
            "batch_1_worker_s": round(one, 2),
            "batch_2_workers_s": round(two, 2),
            "loop_shared_cache_s": round(loop_shared, 2),
            "loop_fresh_cache_s": round(loop_fresh, 2),
            "cpu_s": {
                "batch_1_worker_s": round(one_cpu, 2),
                "batch_2_workers_s": round(two_cpu, 2),
                "loop_shared_cache_s": round(loop_shared_cpu, 2),
                "loop_fresh_cache_s": round(loop_fresh_cpu, 2),
            },
            "vm_task_s": [vm.seconds for vm in report1.vms],
            "vm_task_cpu_s": [vm.cpu_seconds for vm in report1.vms],
            "vm_task_s_2_workers": [vm.seconds for vm in report2.vms],
            "index_task_s": [base["seconds"] for base in report1.bases],
            "overlay_bytes": sum(vm.size for vm in report2.vms),
            "input_bytes": sum(spec.modified.stat().st_size for _, images in vms for spec in images),
        }

        base, modified = sparse_pair(realistic, work)
        big = [("big", [ImageSpec("disk", base, modified)])]
        out, cache = fresh("big-one")
        started = time.perf_counter()
        subprocess.run(
            [
                *VMDELTA,
                "create",
                "-q",
                "-o",
                str(out / "big.overlay"),
                "--disk",
                str(base),
                str(modified),
                "--cache-dir",
                str(cache),
            ],
            check=True,
        )
        whole = time.perf_counter() - started
        print(f"  4 GiB sparse pair, one process: {whole:.1f} s", flush=True)
        sharded, _, report = timed_batch(
            "4 GiB sparse pair, 512 MiB shards on 2 workers",
            as_fleet(big, *fresh("big-shards"), shard_size=512 * MiB),
            2,
        )
        figures["sparse_4g"] = {
            "one_process_s": round(whole, 2),
            "shards_2_workers_s": round(sharded, 2),
            "one_process_bytes": (out / "big.overlay").stat().st_size,
            "sharded_bytes": report.vms[0].size,
        }
        figures["dask_s_per_task"] = scheduler_overhead()
        figures["manifest_s_per_vm"] = manifest_cost(realistic, work)
        figures["load_average_end"] = os.getloadavg()[0]
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def print_table(f: dict[str, Any]) -> None:
    fl, big = f["fleet"], f["sparse_4g"]
    tasks = fl["vm_task_s"]
    print()
    print(
        f"| {fl['vms']} VMs, {fl['bases']} distinct bases | wall time | against batch on 2 workers | processor time |"
    )
    print("|---|---:|---:|---:|")
    for label, key in (
        ("`vmdelta batch`, 2 workers", "batch_2_workers_s"),
        ("`vmdelta batch`, 1 worker", "batch_1_worker_s"),
        ("shell loop of `vmdelta create`, shared index cache", "loop_shared_cache_s"),
        ("shell loop of `vmdelta create`, fresh cache per VM", "loop_fresh_cache_s"),
    ):
        print(f"| {label} | {fl[key]:.1f} s | {fl[key] / fl['batch_2_workers_s']:.2f}x | {fl['cpu_s'][key]:.1f} s |")
    print()
    print(
        f"VM task: {min(tasks):.2f} to {max(tasks):.2f} s (mean {sum(tasks) / len(tasks):.2f} s); index task: "
        + ", ".join(f"{s:.2f} s" for s in fl["index_task_s"])
        + f"; {fl['input_bytes'] / MiB:.0f} MiB of modified images -> {fl['overlay_bytes'] / MiB:.1f} MiB of overlays"
    )
    busy1, busy2 = sum(fl["vm_task_s"]), sum(fl["vm_task_s_2_workers"])
    print(
        f"VM tasks took {busy1:.1f} s in all on 1 worker and {busy2:.1f} s on 2 (the same work: the "
        f"difference is the two workers sharing the machine); processor time per VM task "
        f"{sum(fl['vm_task_cpu_s']) / len(tasks):.2f} s on average"
    )
    print(
        f"Dask: {f['dask_s_per_task'] * 1e3:.2f} ms per trivial task; manifest: "
        f"{f['manifest_s_per_vm'] * 1e3:.2f} ms per VM to read and validate; load average "
        f"{f['load_average_start']:.1f} at the start, {f['load_average_end']:.1f} at the end"
    )
    print()
    print("| 4 GiB sparse disk pair | wall time | overlay |")
    print("|---|---:|---:|")
    print(f"| `vmdelta create`, one process | {big['one_process_s']:.1f} s | {big['one_process_bytes']} B |")
    ratio = big["sharded_bytes"] / big["one_process_bytes"] - 1
    print(
        f"| 512 MiB shards on 2 workers | {big['shards_2_workers_s']:.1f} s | {big['sharded_bytes']} B ({ratio:+.2%}) |"
    )


if __name__ == "__main__":
    main()
