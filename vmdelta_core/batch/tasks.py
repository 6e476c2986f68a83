"""The work a Dask worker does for a batch: plain functions of picklable arguments.

Each runs in a worker process with that process's registry (the plugins installed there), and
returns plain data, so the scheduler never holds more than a report per VM.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from vmdelta_core.config import CreateConfig, ImageSpec
from vmdelta_core.create import create_overlay, shards
from vmdelta_core.errors import VmdeltaError
from vmdelta_core.fileio import check_input
from vmdelta_core.index import load_or_build_index
from vmdelta_core.outputs import storage_error
from vmdelta_core.records import CreateReport
from vmdelta_core.registry import default_registry

__all__ = ["base_key", "create_vm", "create_vm_in_shards", "index_base"]


def base_key(spec: ImageSpec, unit: int, cache_dir: Path | None) -> tuple[Any, ...]:
    """What makes two VMs' bases one index: the same file read the same way, at the same unit
    size, cached in the same place (no file is touched: the driver may not see the files)."""
    options = sorted((k, repr(v)) for k, v in spec.open_options("base").items())
    cache = None if cache_dir is None else os.path.abspath(cache_dir)
    return (os.path.abspath(spec.base), spec.kind, spec.format, tuple(options), unit, cache)


def index_base(spec: ImageSpec, unit: int, cache_dir: Path | None) -> dict[str, Any]:
    """Build (or find) the index of one base in the index cache, where every VM on it reads it.

    The index is keyed exactly as ``create`` keys it (the same source, options and unit size), so
    the VMs' own ``create`` finds it there instead of building it again.
    """
    started = time.monotonic()
    try:
        check_input(spec.base, f"base {spec.kind}")
        registry = default_registry()
        source = spec.format or registry.detect_source(spec.base, spec.kind)
        options = spec.open_options("base")
        with registry.source(source).open(spec.base, kind=spec.kind, options=options) as image:
            index, cached = load_or_build_index(
                spec.base, image, source=source, unit=unit, options=options, cache_dir=cache_dir
            )
    except VmdeltaError as exc:
        return {"error": str(exc)}
    except OSError as exc:
        return {"error": str(storage_error(exc, exc.filename or spec.base, "reading"))}
    return {
        "base": str(spec.base),
        "fingerprint": index.fingerprint,
        "cached": cached,
        "seconds": round(time.monotonic() - started, 3),
    }


def create_vm(name: str, config: CreateConfig, *bases: dict[str, Any], shard_size: int | None = None) -> dict[str, Any]:
    """One VM's overlay, made as ``vmdelta create`` makes it; ``bases`` are the results of the
    :func:`index_base` tasks of its bases, which it waits for (their indexes are in the cache).

    With ``shard_size``, images larger than that are made in address-range tasks that this one
    hands to the cluster and merges (:mod:`vmdelta_core.create.shards`).

    An error a user can cause (a missing file, a bad option, a base that failed) comes back as
    ``{"error": line}``: it is this VM's outcome, not a failure of the worker.
    """
    started, cpu = time.monotonic(), time.process_time()
    failed = next((base["error"] for base in bases if "error" in base), None)
    if failed is not None:
        return {"name": name, "error": failed}
    try:
        report = create_overlay(config) if shard_size is None else _in_shards(config, shard_size)
    except VmdeltaError as exc:
        return {"name": name, "error": str(exc)}
    except OSError as exc:
        return {"name": name, "error": str(storage_error(exc, exc.filename or config.output))}
    return {
        "name": name,
        "overlay": str(report.output),
        "size": report.size,
        "seconds": round(time.monotonic() - started, 3),
        # the worker's processor time while it ran (its one thread, and Dask's own, which is little)
        "cpu_seconds": round(time.process_time() - cpu, 3),
        "images": [image.to_json() for image in report.images],
    }


def create_vm_in_shards(name: str, config: CreateConfig, shard_size: int, *bases: dict[str, Any]) -> dict[str, Any]:
    """:func:`create_vm` with ``shard_size``."""
    return create_vm(name, config, *bases, shard_size=shard_size)


def _in_shards(config: CreateConfig, shard_size: int) -> CreateReport:
    """The overlay of ``config`` from shards of about ``shard_size`` bytes run as tasks of their
    own; this task leaves the worker's thread pool while it waits for them (``worker_client``)."""
    from distributed import worker_client

    ranges = shards.shard_ranges(config, shards.image_sizes(config), shard_size)
    if len(ranges) == len(config.images):  # nothing to split
        return create_overlay(config)
    parts = [shards.part_path(config.output, k) for k in range(len(ranges))]
    try:
        with worker_client() as client:
            scans = [client.submit(shards.scan_shard, config, shard, pure=False) for shard in ranges]
            selection = client.submit(shards.select_shards, config, scans, pure=False)
            outcomes = [
                client.submit(shards.encode_shard, config, shard, selection, k, parts[k], pure=False)
                for k, shard in enumerate(ranges)
            ]
            merged = client.submit(shards.merge_shards, config, ranges, selection, outcomes, parts, pure=False)
            return merged.result()
    finally:
        for part in parts:  # a failed shard's siblings leave theirs
            with contextlib.suppress(OSError):
                os.unlink(part)
