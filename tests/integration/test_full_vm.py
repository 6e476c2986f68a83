"""Every plugin installed: a whole real VM (QEMU memory stream + disk) through create and apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.cli import main
from vmdelta_core.registry import default_registry
from vmdelta_core.testing import files_identical as same


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_every_plugin_is_registered() -> None:
    names = {(i.kind, i.name) for i in default_registry()}
    assert {
        ("source", "qemu"),
        ("source", "raw"),
        ("source", "qcow2"),
        ("filter", "trim"),
        ("filter", "xray"),
        ("filter", "freepfn"),
        ("encoder", "xdelta3"),
        ("encoder", "bsdiff"),
        ("encoder", "xor"),
        ("encoder", "zstd"),
    } <= names


def vm_pairs(f: Path) -> list[str]:
    """``create`` arguments for the whole VM: the 7.2 memory stream and the disk."""
    return [
        "--memory",
        str(f / "base.mem"),
        str(f / "modified.mem"),
        "--disk",
        str(f / "base.img"),
        str(f / "modified.img"),
    ]


def vm_outputs(f: Path, out: Path) -> list[str]:
    """``apply`` arguments rebuilding the whole VM into ``out``."""
    return ["--memory", str(f / "base.mem"), str(out / "vm.mem"), "--disk", str(f / "base.img"), str(out / "vm.img")]


def rebuilt_vm_identical(f: Path, out: Path) -> bool:
    return same(out / "vm.mem", f / "modified.mem") and same(out / "vm.img", f / "modified.img")


def test_whole_vm_round_trip_with_the_default_pipeline(realistic: Path, tmp_path: Path, capsys) -> None:
    overlay = tmp_path / "vm.overlay"
    cli(capsys, "create", "-q", "-o", str(overlay), *vm_pairs(realistic))
    meta = json.loads(cli(capsys, "inspect", "--json", str(overlay)))["metadata"]
    memory, disk = meta["images"]
    assert (memory["source"], disk["source"]) == ("qemu", "raw")
    assert memory["statistics"]["base_disk"] > 1000  # page-cache pages found on the base disk
    assert memory["layout"]["blocks"][0]["name"] == "pc.ram"
    out = json.loads(cli(capsys, "apply", "--json", str(overlay), *vm_outputs(realistic, tmp_path)))
    assert all(image["artifact_identical"] for image in out["images"])
    assert rebuilt_vm_identical(realistic, tmp_path)


def test_all_encoders_with_the_best_policy(realistic: Path, tmp_path: Path, capsys) -> None:
    overlay, raw_overlay = tmp_path / "best.overlay", tmp_path / "raw.overlay"
    cli(capsys, "create", "-q", "-o", str(raw_overlay), "--encoder", "raw", *vm_pairs(realistic))
    everything = ["--encoder", "xor,zstd,xdelta3,bsdiff,raw", "--policy", "best"]
    cli(capsys, "create", "-q", "-o", str(overlay), *everything, *vm_pairs(realistic))
    assert overlay.stat().st_size < raw_overlay.stat().st_size
    meta = json.loads(cli(capsys, "inspect", "--json", str(overlay)))["metadata"]
    used = {name for image in meta["images"] for name in image["statistics"]["encoders"]}
    assert len(used) >= 3
    cli(capsys, "apply", "-q", str(overlay), *vm_outputs(realistic, tmp_path))
    assert rebuilt_vm_identical(realistic, tmp_path)


def test_filters_drop_and_apply_rebuilds_from_the_base(realistic: Path, tmp_path: Path, capsys) -> None:
    f = realistic
    overlay = tmp_path / "filtered.overlay"
    filters = ["--filter", f"freepfn:{f / 'free-pfns-B.txt'}", "--filter", f"trim:{f / 'trim-trace.log'}"]
    cli(capsys, "create", "-q", "-o", str(overlay), *vm_pairs(f), *filters)
    meta = json.loads(cli(capsys, "inspect", "--json", str(overlay)))["metadata"]
    dropped = {fl["name"]: fl["dropped"] for image in meta["images"] for fl in image["filters"]}
    assert dropped["freepfn"] == 4466 and dropped["trim"] == 2729
    strict = tmp_path / "strict"
    strict.mkdir()
    assert main(["apply", "-q", "--strict", str(overlay), *vm_outputs(f, strict)]) == 2
    assert not any(strict.iterdir())
    cli(capsys, "apply", "-q", str(overlay), *vm_outputs(f, tmp_path))
    # the rebuilt disk is the modified one except the dropped units, which are the base's
    unit = 4096
    rebuilt, modified, base = (
        np.fromfile(p, dtype=np.uint8).reshape(-1, unit)
        for p in (tmp_path / "vm.img", f / "modified.img", f / "base.img")
    )
    differ = np.flatnonzero((rebuilt != modified).any(axis=1))
    assert differ.size == dropped["trim"]
    assert (rebuilt[differ] == base[differ]).all()


def test_thin_qcow2_output(realistic: Path, tmp_path: Path, capsys) -> None:
    f = realistic
    overlay = tmp_path / "disk.overlay"
    cli(capsys, "create", "-q", "-o", str(overlay), "--disk", str(f / "base.img"), str(f / "modified.img"))
    cli(
        capsys,
        "apply",
        "-q",
        str(overlay),
        "--disk",
        str(f / "base.img"),
        str(tmp_path / "thin.qcow2"),
        "--disk-format",
        "qcow2",
    )
    head = (tmp_path / "thin.qcow2").read_bytes()[:4]
    assert head == b"QFI\xfb"
    assert (tmp_path / "thin.qcow2").stat().st_size < 40 << 20


VARIANTS = [
    "",
    "variants/qemu-10.0-stream",
    "variants/qemu-10.0-mapped-ram",
    "variants/qemu-7.2-ignore-shared",
    "variants/qemu-10.0-ignore-shared",
    "variants/discard-ignore",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_default_encoding_never_loses_to_raw(realistic: Path, variant: str, tmp_path: Path, capsys) -> None:
    """On every real capture, the default encoders and policy give an overlay no larger than raw units."""
    folder = realistic / variant
    pairs = ["--disk", str(folder / "base.img"), str(folder / "modified.img")]
    if (folder / "base.mem").exists():
        pairs = ["--memory", str(folder / "base.mem"), str(folder / "modified.mem"), *pairs]
        if (folder / "base-ram.raw").exists():
            pairs += ["--memory-ram", str(folder / "base-ram.raw"), str(folder / "modified-ram.raw")]
    default, raw = tmp_path / "default.overlay", tmp_path / "raw.overlay"
    cli(capsys, "create", "-q", "-o", str(default), *pairs)
    cli(capsys, "create", "-q", "-o", str(raw), "--encoder", "raw", *pairs)
    assert default.stat().st_size <= raw.stat().st_size
