"""``vmdelta batch``: the overlays of many VMs on a Dask cluster, from a TOML manifest.

Dask and :mod:`vmdelta_core.batch` are imported only when the command runs, so ``vmdelta --help``
starts as fast without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_batch_parser", "batch"]

_EXAMPLE = """\
A manifest lists VMs, each written as a pipeline file writes one overlay (`vmdelta run`);
VMs may share bases, whose indexes are then built once, in parallel, and reused:

  [defaults]                     # overlay settings every VM takes unless it sets its own
  cache_dir = "index-cache"      # where base indexes are kept: storage every worker reads

  [batch]
  report = "fleet-report.json"   # every VM's overlay, size, time and statistics, or its error
  shard_size = 1073741824        # optional: images over 1 GiB made by 1 GiB address-range tasks

  [[vms]]
  name = "tenant-a"
  overlay = { output = "out/tenant-a.overlay" }
  images = [
    { kind = "memory", base = "app.mem", modified = "tenant-a.mem" },
    { kind = "disk", base = "app.img", modified = "tenant-a.img", filters = ["trim:a-trim.log"] },
  ]

Schema: schemas/batch.schema.json. Without --scheduler the batch runs on a local cluster of
worker processes; `dask scheduler` and `dask worker ADDRESS` on other machines make a real one.
A VM that fails is reported with its error and the others go on; the exit status is 0 only when
every overlay was written. More in docs/fleets.md."""


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers, got {text!r}") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be from 1 to 4096, got {value}")
    return value


def add_batch_parser(sub: Any) -> None:
    """The ``batch`` subcommand, on the parser's subcommands ``sub``."""
    p = sub.add_parser(
        "batch",
        help="create the overlays of many VMs on a Dask cluster",
        description="Create the overlay of every VM a TOML manifest lists, on a Dask cluster.",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", metavar="MANIFEST.toml", help="the VMs; relative paths in it are relative to it")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a running Dask scheduler (tcp://host:8786); default: a local cluster on this machine",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="worker processes of the local cluster (default: one per core); with --scheduler, "
        "how many workers to wait for before starting",
    )
    p.add_argument("--report", metavar="FILE", help="write the JSON report here (overrides the manifest's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no per-VM lines")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=batch)


def batch(args: argparse.Namespace) -> int:
    from vmdelta_core.errors import ConfigError

    if importlib.util.find_spec("distributed") is None:
        from vmdelta_core.batch.runner import INSTALL_HINT

        raise ConfigError(INSTALL_HINT)
    import attrs

    from vmdelta_core.batch import batch as run
    from vmdelta_core.batch import load_manifest
    from vmdelta_core.outputs import OutputSet

    manifest = Path(args.manifest)
    fleet = load_manifest(manifest)
    if args.report:
        fleet = attrs.evolve(fleet, report=Path(args.report))
    if fleet.report is not None:
        OutputSet([manifest]).check(fleet.report)  # the fleet's own inputs are checked by batch()
    events = _Shown(quiet=args.quiet or args.json)
    try:
        with events:
            report = run(fleet, scheduler=args.scheduler, workers=args.workers, events=events)
    except KeyboardInterrupt:
        # each overlay appears whole or not at all: those finished before are there to keep
        print(
            f"vmdelta: interrupted; {events.written} of {len(fleet.vms)} overlays had been written, "
            "the others were not",
            file=sys.stderr,
        )
        return 130
    if args.json:
        from vmdelta_core.cli.output import print_json

        print_json(report.to_json())
    elif not args.quiet:
        from vmdelta_core.cli.output import console

        where = f"; report in {fleet.report}" if fleet.report is not None else ""
        written = len(report.vms) - len(report.failed)
        console.print(f"{written} of {len(report.vms)} overlays written in {report.seconds:.1f} s{where}")
    if report.failed:
        print(f"vmdelta: error: {len(report.failed)} of {len(report.vms)} VMs failed", file=sys.stderr)
        return 1
    return 0


class _Shown:
    """The batch as it goes: the dashboard's link, one line per VM, a bar on a terminal."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.written = 0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Shown:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def connected(self, scheduler: str, dashboard: str | None, workers: int, vms: int) -> None:
        if self.quiet:
            return
        from vmdelta_core.cli.output import err_console

        where = f"; dashboard: {dashboard}" if dashboard else ""
        err_console.print(f"{vms} VMs on {workers} Dask workers ({scheduler}){where}")
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("overlays"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console.get(),
            )
            self._task = self._bar.add_task("overlays", total=vms)
            self._bar.start()

    def finished(self, result: Any) -> None:
        self.written += result.ok
        if self.quiet:
            return
        from vmdelta_core.cli.output import err_console, printable

        if result.ok:
            err_console.print(f"  {result.name}: {result.overlay} ({result.size} bytes, {result.seconds:.1f} s)")
        else:
            err_console.print(f"  {result.name}: FAILED: {printable(result.error)}")
        if self._bar is not None:
            self._bar.advance(self._task)
