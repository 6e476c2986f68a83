"""No input is ever an output, and base and modified are the same kind of artifact: with every
plugin installed, on the real captures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmdelta_core.cli import main


def local(source: Path, folder: Path) -> Path:
    """The fixture under ``folder``: a hard link where possible (a replaced link leaves the
    fixture itself untouched), else a copy."""
    target = folder / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    _, err = capsys.readouterr()
    assert err.count("\n") == 1, err
    return code, err


def test_create_never_writes_over_a_side_input(realistic: Path, tmp_path: Path, capsys) -> None:
    shared = realistic / "variants" / "qemu-7.2-ignore-shared"
    files = {name: local(shared / name, tmp_path) for name in ("base.mem", "modified.mem", "base-ram.raw")}
    files["modified-ram.raw"] = local(shared / "modified-ram.raw", tmp_path)
    ram = files["base-ram.raw"]
    before = ram.stat()
    memory = ["--memory", str(files["base.mem"]), str(files["modified.mem"])]
    ram_pair = ["--memory-ram", str(ram), str(files["modified-ram.raw"])]
    code, err = refused(capsys, "create", "-q", "-o", str(ram), *memory, *ram_pair)
    assert code == 2 and "same file as an input" in err
    after = ram.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("name", ["trim", "freepfn"])
def test_create_never_writes_over_a_filter_input(realistic: Path, tmp_path: Path, capsys, name: str) -> None:
    if name == "trim":
        given = shutil.copyfile(realistic / "trim-trace.log", tmp_path / "trace.log")
        pair = ["--disk", str(realistic / "base.img"), str(realistic / "modified.img")]
    else:
        given = shutil.copyfile(realistic / "free-pfns-B.txt", tmp_path / "free.txt")
        pair = ["--memory", str(realistic / "base.mem"), str(realistic / "modified.mem")]
    text = Path(given).read_bytes()
    code, err = refused(capsys, "create", "-q", "-o", str(given), *pair, "--filter", f"{name}:{given}")
    assert code == 2 and "same file as an input" in err and Path(given).read_bytes() == text


@pytest.mark.parametrize("damage", ["empty", "magic"])
def test_a_modified_memory_no_source_recognises_is_refused(realistic: Path, tmp_path: Path, capsys, damage) -> None:
    modified = tmp_path / "modified.mem"
    if damage == "empty":
        modified.write_bytes(b"")
    else:
        with open(realistic / "modified.mem", "rb") as f:
            data = bytearray(f.read(1 << 20))
        data[0] ^= 0xFF
        modified.write_bytes(bytes(data))
    overlay = tmp_path / "vm.overlay"
    code, err = refused(
        capsys, "create", "-q", "-o", str(overlay), "--memory", str(realistic / "base.mem"), str(modified)
    )
    assert code == 2 and "same kind of artifact" in err and not overlay.exists()
