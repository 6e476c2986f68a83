"""``vmdelta batch`` on a local Dask cluster of two worker processes, on the real fixtures: the
overlays are those ``create`` makes, each base is indexed once, a failing VM stops no other, a
worker killed mid-batch is survived."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from vmdelta_core.api import (
    ApplyConfig,
    ApplyImageSpec,
    CreateConfig,
    Fleet,
    ImageSpec,
    VmSpec,
    apply_overlay,
    batch,
    create_overlay,
)
from vmdelta_core.batch import load_manifest
from vmdelta_core.cli import main
from vmdelta_core.testing import files_identical

distributed = pytest.importorskip("distributed")


def write_manifest(folder: Path, realistic: Path, *, broken: bool = False) -> Path:
    """Three VMs on two bases (two VMs share one), and with ``broken`` a fourth whose modified
    disk does not exist."""
    discard = realistic / "variants/discard-ignore"
    vms = [
        ("a", realistic / "base.img", realistic / "modified.img"),
        ("b", realistic / "base.img", discard / "modified.img"),
        ("c", discard / "base.img", realistic / "modified.img"),
    ]
    if broken:
        vms.insert(1, ("broken", realistic / "base.img", folder / "missing.img"))
    lines = ['[defaults]\ncache_dir = "cache"\n']
    for name, base, modified in vms:
        lines.append(
            f'[[vms]]\nname = "{name}"\noverlay = {{ output = "out/{name}.overlay" }}\n'
            f'images = [{{ kind = "disk", base = "{base}", modified = "{modified}" }}]\n'
        )
    (folder / "out").mkdir(exist_ok=True)
    manifest = folder / "fleet.toml"
    manifest.write_text("\n".join(lines))
    return manifest


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two worker processes of one thread, as the batch's own local cluster has."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL
    ) as local:
        yield local


@pytest.mark.fixtures
def test_batch_overlays_are_those_of_create_and_apply_byte_exact(realistic: Path, tmp_path: Path, cluster) -> None:
    manifest = write_manifest(tmp_path, realistic)
    report = batch(manifest, scheduler=cluster.scheduler_address)
    assert report.succeeded and [vm.name for vm in report.vms] == ["a", "b", "c"]
    # one index per distinct base, in the shared cache, though two VMs read realistic/base.img
    assert len(list((tmp_path / "cache").glob("*.vmdidx"))) == 2
    assert [base["cached"] for base in report.bases] == [False, False]
    for vm, spec in zip(report.vms, load_manifest(manifest).vms, strict=True):
        single = tmp_path / f"{vm.name}.single.overlay"
        made = create_overlay(attrs.evolve(spec.config, output=single))
        assert vm.overlay.read_bytes() == single.read_bytes()
        assert vm.size == made.size and vm.images[0]["statistics"]["changed"] > 1000
    a = load_manifest(manifest).vms[0].config.images[0]
    rebuilt = tmp_path / "a.rebuilt.img"
    apply_overlay(
        ApplyConfig(
            overlay=report.vms[0].overlay,
            images=[ApplyImageSpec("disk", a.base, rebuilt)],
            cache_dir=tmp_path / "cache",
        )
    )
    assert files_identical(rebuilt, a.modified)


@pytest.mark.fixtures
def test_a_failing_vm_stops_no_other_and_sets_the_exit_status(realistic: Path, tmp_path: Path, capsys) -> None:
    """Through the command line and its own local cluster of two processes."""
    manifest = write_manifest(tmp_path, realistic, broken=True)
    report_file = tmp_path / "report.json"
    code = main(["batch", str(manifest), "--workers", "2", "--report", str(report_file)])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines()[-1] == "vmdelta: error: 1 of 4 VMs failed"
    report = json.loads(report_file.read_text())
    assert report["succeeded"] is False and report["workers"] == 2
    outcome = {vm["name"]: vm for vm in report["vms"]}
    assert [vm["name"] for vm in report["vms"]] == ["a", "broken", "b", "c"]
    assert "missing.img does not exist" in outcome["broken"]["error"]
    assert not (tmp_path / "out/broken.overlay").exists()
    for name in ("a", "b", "c"):
        assert outcome[name]["ok"] and outcome[name]["size"] == (tmp_path / f"out/{name}.overlay").stat().st_size
        assert outcome[name]["images"][0]["statistics"]["changed"] > 1000


@pytest.mark.fixtures
def test_a_worker_killed_mid_batch_is_survived(realistic: Path, tmp_path: Path, cluster) -> None:
    manifest = write_manifest(tmp_path, realistic)
    done: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: done.update(report=batch(manifest, scheduler=cluster.scheduler_address)), daemon=True
    )
    with distributed.Client(cluster.scheduler_address) as client:
        runner.start()
        victim, key = _worker_running_a_vm(client)
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        runner.join(timeout=600)
        client.wait_for_workers(2, timeout=120)  # the nanny brings the worker back for the next test
        assert victim not in client.scheduler_info(n_workers=-1)["workers"]  # it died, mid-VM
    report = done["report"]
    assert report.succeeded, [vm.error for vm in report.failed]
    # the VM the worker died making was made again, elsewhere, whole
    (vm,) = [vm for vm in report.vms if f"vm-{vm.name}" == key]
    (spec,) = [spec for spec in load_manifest(manifest).vms if spec.name == vm.name]
    single = tmp_path / "single.overlay"
    create_overlay(attrs.evolve(spec.config, output=single))
    assert vm.overlay.read_bytes() == single.read_bytes()


def _worker_running_a_vm(client: Any) -> tuple[str, str]:
    """A worker as soon as it runs a VM's task, and that task's key."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for worker, keys in client.processing().items():
            for key in keys:
                if str(key).startswith("vm-"):
                    return worker, str(key)
        time.sleep(0.02)
    raise AssertionError("no VM task ran within 300 s")


def test_manifest_errors_name_the_vm_and_field(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "fleet.toml"
    manifest.write_text(
        '[[vms]]\noverlay = { output = "a.overlay" }\nimages = [{ kind = "tape", base = "b", modified = "m" }]\n'
    )
    code = main(["batch", str(manifest)])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"vmdelta: error: {manifest}: vms/0/images/0/kind: 'tape' is not one of")
    manifest.write_text(
        '[[vms]]\noverlay = { output = "a.overlay" }\nimages = [{ kind = "disk", base = "b", modified = "m" }]\n'
        '[[vms]]\noverlay = { output = "a.overlay" }\nimages = [{ kind = "disk", base = "b", modified = "m2" }]\n'
    )
    code = main(["batch", str(manifest)])
    _, err = capsys.readouterr()
    assert code == 2 and err == "vmdelta: error: two VMs are named 'a'; give each VM its own name\n"
    # a report that would replace an input is refused before any work
    manifest.write_text(
        '[[vms]]\noverlay = { output = "a.overlay" }\nimages = [{ kind = "disk", base = "b", modified = "m" }]\n'
    )
    (tmp_path / "m").write_bytes(b"modified")
    code = main(["batch", str(manifest), "--report", str(tmp_path / "m")])
    _, err = capsys.readouterr()
    assert code == 2 and "is the same file as an input" in err and (tmp_path / "m").read_bytes() == b"modified"


def test_without_dask_one_line_says_how_to_install_it(tmp_path: Path, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    code = main(["batch", str(tmp_path / "fleet.toml")])
    _, err = capsys.readouterr()
    assert code == 2 and err == "vmdelta: error: vmdelta batch needs Dask: pip install 'vmdelta-core[batch]'\n"


def test_help_does_not_import_dask() -> None:
    code = (
        "import sys; from vmdelta_core.cli.parser import build_parser; build_parser(); "
        "sys.exit('dask' in sys.modules or 'distributed' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.fixtures
def test_a_vm_made_in_shards_is_the_overlay_of_one_made_whole_and_applies_byte_exact(
    realistic: Path, tmp_path: Path, cluster
) -> None:
    """Two images of 128 MiB in 32 MiB shards: eight address-range tasks on two workers."""
    v = realistic / "variants/qemu-7.2-ignore-shared"
    images = [
        ImageSpec("memory", v / "base-ram.raw", v / "modified-ram.raw"),
        ImageSpec("disk", v / "base.img", v / "modified.img"),
    ]
    config = CreateConfig(output=tmp_path / "sharded.overlay", images=images, cache_dir=tmp_path / "cache", threads=1)
    fleet = Fleet([VmSpec("vm", config)], shard_size=32 << 20)
    report = batch(fleet, scheduler=cluster.scheduler_address)
    assert report.succeeded, [vm.error for vm in report.failed]
    whole = create_overlay(attrs.evolve(config, output=tmp_path / "whole.overlay"))
    sharded = report.vms[0]
    # dedup exact across shards and the items framed again as one process frames them: the same
    # overlay, byte for byte (the bound the format promises is 0.5%)
    assert sharded.size == whole.size
    assert sharded.overlay.read_bytes() == whole.output.read_bytes()
    assert sharded.images[1]["statistics"]["self"] > 1000  # disk units found in the memory image
    assert not list(tmp_path.glob(".sharded.overlay.shard-*"))  # the parts are gone
    outs = [tmp_path / "ram.out", tmp_path / "disk.out"]
    apply_overlay(
        ApplyConfig(
            overlay=sharded.overlay,
            images=[ApplyImageSpec(s.kind, s.base, o) for s, o in zip(images, outs, strict=True)],
            cache_dir=tmp_path / "cache",
        )
    )
    assert files_identical(outs[0], images[0].modified) and files_identical(outs[1], images[1].modified)


def test_the_documented_manifests_are_valid() -> None:
    """The examples in ``vmdelta batch --help``, docs/fleets.md and the README read as they say."""
    import re
    import tomllib

    from vmdelta_core.batch.manifest import fleet_from_mapping
    from vmdelta_core.cli.batch import _EXAMPLE

    root = Path(__file__).resolve().parent.parent
    examples = ["\n".join(line[2:] for line in _EXAMPLE.splitlines() if line.startswith("  "))]
    for doc in ("docs/fleets.md", "README.md"):
        examples += [b for b in re.findall(r"```toml\n(.*?)```", (root / doc).read_text(), re.S) if "[[vms]]" in b]
    assert len(examples) == 3
    for text in examples:
        fleet = fleet_from_mapping(tomllib.loads(text), folder=Path("/fleet"))
        assert fleet.vms and fleet.report == Path("/fleet/fleet-report.json")
