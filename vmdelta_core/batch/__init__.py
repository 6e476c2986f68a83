"""``batch``: the overlays of a fleet of VMs, made on a Dask cluster.

:mod:`.manifest` reads the TOML manifest (the VMs, each as a pipeline file writes it),
:mod:`.runner` runs it on Dask (one index task per distinct base, one task per VM), :mod:`.tasks`
is what the workers run, :mod:`.report` what comes back. Dask is imported only when a batch runs.
"""

from __future__ import annotations

from pathlib import Path

from vmdelta_core.batch.manifest import Fleet, VmSpec, load_manifest
from vmdelta_core.batch.report import BatchReport, VmResult
from vmdelta_core.batch.runner import INSTALL_HINT, BatchEvents, run_batch
from vmdelta_core.outputs import OutputSet

__all__ = ["INSTALL_HINT", "BatchEvents", "BatchReport", "Fleet", "VmResult", "VmSpec", "batch", "load_manifest"]


def batch(
    fleet: Fleet | Path | str,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    events: BatchEvents | None = None,
) -> BatchReport:
    """Make the overlay of every VM of ``fleet`` (a :class:`Fleet` or a TOML manifest's path) on
    Dask, and write the report when the fleet names one.

    :param scheduler: a running Dask scheduler's address; a local cluster of processes when ``None``.
    :param workers: the local cluster's worker processes (one per core when ``None``); with a
        scheduler, how many workers to wait for.
    """
    inputs: list[Path] = []
    if not isinstance(fleet, Fleet):
        inputs.append(Path(fleet))
        fleet = load_manifest(Path(fleet))
    if fleet.report is not None:  # refused now, not once the fleet is made
        inputs += [path for vm in fleet.vms for spec in vm.config.images for path in spec.input_paths()]
        OutputSet(inputs).check(fleet.report)
    report = run_batch(fleet, scheduler=scheduler, workers=workers, events=events)
    if fleet.report is not None:
        report.write(fleet.report)
    return report
