"""Running a batch on Dask: one index task per distinct base, then one task per VM.

Indexes go through the shared index cache (:mod:`vmdelta_core.index`), not through Dask: a VM's
task depends on the index tasks of its bases, which leave each index in the cache folder where
the VM's own ``create`` finds it. The bases must be readable by every worker anyway (dedup
confirms every match against the base's bytes), the cache folder can sit beside them on the same
storage, and an index there outlives the batch: the next night's batch on the same bases builds
none. An index handed through Dask would instead travel through the workers' memory once per
worker and every batch, and be gone when the batch ends.

Without a scheduler address a ``LocalCluster`` of worker processes runs on this machine. A worker
lost mid-batch costs only its running tasks, which the scheduler gives to another worker; a VM
that fails is reported with its error and the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from vmdelta_core.batch.manifest import Fleet, VmSpec
from vmdelta_core.batch.report import BatchReport, VmResult
from vmdelta_core.batch.tasks import base_key, create_vm, create_vm_in_shards, index_base
from vmdelta_core.errors import ConfigError

__all__ = ["INSTALL_HINT", "BatchEvents", "run_batch"]

INSTALL_HINT = "vmdelta batch needs Dask: pip install 'vmdelta-core[batch]'"
#: seconds to wait for ``workers`` to join a running scheduler
WAIT_FOR_WORKERS = 600


class BatchEvents:
    """What a batch tells as it goes (the CLI draws progress from it); every method is optional."""

    def connected(self, scheduler: str, dashboard: str | None, workers: int, vms: int) -> None:
        """The cluster is up: its address, its dashboard's link (if it serves one)."""

    def finished(self, result: VmResult) -> None:
        """One VM is done, written or failed."""


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return distributed


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int | None) -> Iterator[Any]:
    """A client of the scheduler at ``scheduler`` (waiting for ``workers`` to join), or of a
    fresh local cluster of ``workers`` processes of one thread each."""
    distributed = _distributed()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            if workers:
                try:
                    client.wait_for_workers(workers, timeout=WAIT_FOR_WORKERS)
                except TimeoutError:
                    joined = len(client.scheduler_info(n_workers=-1).get("workers", {}))
                    raise ConfigError(
                        f"{joined} of the {workers} workers asked for joined {scheduler} within {WAIT_FOR_WORKERS} s"
                    ) from None
            yield client
        return
    import os

    count = workers or max(1, os.cpu_count() or 1)
    # one thread a worker: a VM's create is numpy, hashing and compression, which want a core each
    with _interrupts_left_to_this_process():
        cluster = distributed.LocalCluster(
            n_workers=count,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0" if _has_dashboard() else None,
            # what a VM's failure says is in its result; a worker's own logs (a heartbeat lost
            # while the cluster closes) are not the user's business
            silence_logs=logging.CRITICAL,
        )
    with cluster, distributed.Client(cluster) as client:
        yield client


@contextlib.contextmanager
def _interrupts_left_to_this_process() -> Iterator[None]:
    """Ctrl-C reaches every process of the terminal's group: worker processes started while
    SIGINT is ignored keep ignoring it (Python leaves an ignored SIGINT ignored), so only this
    process sees it, and it closes the cluster, instead of each worker printing a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401  (the dashboard is served only with it)
    except ImportError:
        return False
    return True


def run_batch(
    fleet: Fleet,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    events: BatchEvents | None = None,
) -> BatchReport:
    """Make every VM's overlay of ``fleet`` on a Dask cluster; a failed VM does not stop the rest.

    :param scheduler: a running Dask scheduler's address (``tcp://host:8786``); a local cluster
        of worker processes when ``None``.
    :param workers: the local cluster's worker processes (one per core when ``None``); with a
        scheduler, how many workers to wait for before starting.
    :returns: one result per VM, in the fleet's order; :attr:`BatchReport.succeeded` tells whether
        every overlay was written.
    """
    events = events or BatchEvents()
    started = time.monotonic()
    with _client(scheduler, workers) as client:
        distributed = _distributed()
        count = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        dashboard = client.dashboard_link if _dashboard_served(client) else None
        events.connected(client.scheduler.address, dashboard, count, len(fleet.vms))
        indexes = _submit_indexes(client, fleet)
        futures = {_submit_vm(client, vm, indexes, fleet.shard_size): vm for vm in fleet.vms}
        results: dict[str, VmResult] = {}
        for future in distributed.as_completed(futures):
            result = _result_of(future, futures[future])
            results[result.name] = result
            events.finished(result)
        bases = tuple(client.gather(list(indexes.values()), errors="skip"))
    return BatchReport(
        vms=tuple(results[vm.name] for vm in fleet.vms),
        seconds=time.monotonic() - started,
        scheduler=scheduler or "local",
        workers=count,
        dashboard=dashboard,
        bases=bases,
    )


def _dashboard_served(client: Any) -> bool:
    with contextlib.suppress(Exception):
        return bool(client.scheduler_info(n_workers=0).get("services", {}).get("dashboard"))
    return False


def _submit_indexes(client: Any, fleet: Fleet) -> dict[tuple[Any, ...], Any]:
    """One index task per distinct base, all at once: they run in parallel on the workers."""
    futures: dict[tuple[Any, ...], Any] = {}
    for vm in fleet.vms:
        config = vm.config
        for spec in config.images:
            key = base_key(spec, config.unit_size, config.cache_dir)
            if key not in futures:
                futures[key] = client.submit(
                    index_base,
                    spec,
                    config.unit_size,
                    config.cache_dir,
                    key=f"index-{len(futures)}-{spec.base.name}",
                    pure=False,
                )
    return futures


def _submit_vm(client: Any, vm: VmSpec, indexes: dict[tuple[Any, ...], Any], shard_size: int | None) -> Any:
    config = vm.config
    bases = [indexes[base_key(spec, config.unit_size, config.cache_dir)] for spec in config.images]
    if shard_size is not None:
        return client.submit(create_vm_in_shards, vm.name, config, shard_size, *bases, key=f"vm-{vm.name}", pure=False)
    return client.submit(create_vm, vm.name, config, *bases, key=f"vm-{vm.name}", pure=False)


def _result_of(future: Any, vm: VmSpec) -> VmResult:
    """The VM's result, or its error as one line (a base's failure is each of its VMs' error)."""
    try:
        done = future.result()
    except Exception as exc:  # a worker lost too often, a plugin's bug: still only this VM's end
        return VmResult(vm.name, vm.config.output, error=f"{type(exc).__name__}: {exc}")
    if "error" in done:
        return VmResult(vm.name, vm.config.output, error=done["error"])
    return VmResult(
        vm.name,
        vm.config.output,
        size=done["size"],
        seconds=done["seconds"],
        cpu_seconds=done["cpu_seconds"],
        images=tuple(done["images"]),
    )
