"""``vmdelta create`` + ``apply`` on every QEMU capture, and the rebuilt snapshot resumed in QEMU.

The load test follows ``shared/fixtures/README.md``: the fixture driver (kept inside
``shared/tools/make-qemu-fixtures.sh``) starts QEMU with the capture's command line plus
``-incoming``, sends ``cont`` and the guest's ``GO B restore-check``, and requires the guest to
pass its own check and power off. It runs where ``qemu-system-x86_64`` is installed (QEMU 7.2
from Debian 12 for the 7.2 captures); the QEMU 10.0 captures need QEMU 10 unpacked by
``tools/fetch-qemu10.sh`` (``$VMDELTA_QEMU10``, default ``/tmp/vmdelta-qemu10``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmdelta_core.testing import main

pytestmark = pytest.mark.fixtures

VARIANTS = [
    "",
    "variants/qemu-10.0-stream",
    "variants/qemu-10.0-mapped-ram",
    "variants/qemu-7.2-ignore-shared",
    "variants/qemu-10.0-ignore-shared",
]


@pytest.fixture(scope="module")
def rebuilt(fixture_set: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path | None]]:
    """Rebuild every capture's modified snapshot from its base and an overlay, once."""
    out: dict[str, tuple[Path, Path | None]] = {}
    for variant in VARIANTS:
        folder = fixture_set / variant
        work = tmp_path_factory.mktemp("e2e")
        overlay = work / "memory.vmdo"
        shared = "ignore-shared" in variant
        ram_args = ["--memory-ram", str(folder / "base-ram.raw"), str(folder / "modified-ram.raw")] if shared else []
        code = main(
            [
                "create",
                "-o",
                str(overlay),
                "--memory",
                str(folder / "base.mem"),
                str(folder / "modified.mem"),
                *ram_args,
            ]
        )
        assert code == 0, f"create failed for {variant or 'primary'}"
        mem, ram = work / "modified.mem", (work / "modified-ram.raw" if shared else None)
        ram_args = ["--memory-ram", str(folder / "base-ram.raw"), str(ram)] if shared else []
        code = main(["apply", str(overlay), "--memory", str(folder / "base.mem"), str(mem), *ram_args])
        assert code == 0, f"apply failed for {variant or 'primary'}"
        out[variant] = (mem, ram)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_cli_round_trip_is_byte_identical(fixture_set: Path, rebuilt: dict, variant: str) -> None:
    mem, ram = rebuilt[variant]
    folder = fixture_set / variant
    assert mem.read_bytes() == (folder / "modified.mem").read_bytes()
    if ram is not None:
        assert ram.read_bytes() == (folder / "modified-ram.raw").read_bytes()


def test_ignore_shared_without_ram_files_is_one_clear_error(
    fixture_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = fixture_set / "variants/qemu-10.0-ignore-shared"
    code = main(
        ["create", "-o", str(tmp_path / "x.vmdo"), "--memory", str(folder / "base.mem"), str(folder / "modified.mem")]
    )
    err = capsys.readouterr().err
    assert code != 0 and "--memory-ram" in err and "Traceback" not in err
    assert not (tmp_path / "x.vmdo").exists()


# -- loading in a real QEMU ---------------------------------------------------------------------


def _driver(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    here = Path(__file__).resolve()
    roots = [Path(os.environ["VMDELTA_SHARED"])] if os.environ.get("VMDELTA_SHARED") else []
    roots += [parent / "shared" for parent in here.parents]
    script = next(
        (r / "tools" / "make-qemu-fixtures.sh" for r in roots if (r / "tools" / "make-qemu-fixtures.sh").is_file()),
        None,
    )
    if script is None:
        return None
    text = script.read_text()
    found = re.search(r"^cat >\"\$DRIVER\" <<'PYEOF'\n(.*?)^PYEOF$", text, re.S | re.M)
    if not found:
        return None
    driver = tmp_path_factory.mktemp("driver") / "fixture_driver.py"
    driver.write_text(found.group(1))
    return driver


def _qemu10() -> Path | None:
    root = Path(os.environ.get("VMDELTA_QEMU10", "/tmp/vmdelta-qemu10"))
    return root if (root / "usr/bin/qemu-system-x86_64").is_file() else None


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_rebuilt_snapshot_resumes_in_qemu(
    fixture_set: Path, rebuilt: dict, variant: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    manifest = json.loads((fixture_set / variant / "manifest.json").read_text())
    major = manifest["qemu_version"]["qemu"]["major"]
    extra: list[str] = []
    if major >= 9:
        root = _qemu10()
        if root is None:
            pytest.skip("QEMU 10 not unpacked (plugins/vmdelta-source-qemu/tools/fetch-qemu10.sh)")
        extra = ["--qemu10-root", str(root)]
    elif shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    driver = _driver(tmp_path_factory)
    if driver is None:
        pytest.skip("fixture driver (shared/tools/make-qemu-fixtures.sh) not available")
    mem, ram = rebuilt[variant]
    if ram is not None:
        extra += ["--ram-file", str(ram)]
    proc = subprocess.run(
        [
            sys.executable,
            str(driver),
            "loadback",
            str(fixture_set / variant),
            "--tag",
            "modified",
            "--mem",
            str(mem),
            "--timeout",
            "300",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result: {proc.stderr[-2000:]}"
    result = json.loads(lines[-1])
    if proc.returncode in (2, 3):
        pytest.skip(f"the load test could not run here: {result.get('error')}")
    assert result["ok"], f"QEMU did not resume the rebuilt snapshot: {result.get('error')} {result.get('failed_stage')}"
    assert result["status_after_load"] == "paused"
    assert any("SHUTDOWN" in m for m in result["markers_seen"])
