"""QEMU loads the memory stream ``vmdelta apply - --memory BASE -`` writes while the overlay is
still arriving, and never resumes from an overlay cut short: the stream's end is held back until
everything is verified.

QEMU reads the stream through a FIFO (``-incoming "exec:cat FIFO"``, as the fixture driver loads
the captures), so pages reach it as apply rebuilds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_qemu_cli import _driver

pytestmark = [pytest.mark.fixtures, pytest.mark.slow]

VMDELTA = [sys.executable, "-m", "vmdelta_core"]


def _stream_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture driver, taking a FIFO for ``--mem`` (it accepts regular files only)."""
    driver = _driver(tmp_path_factory)
    if driver is None:
        pytest.skip("fixture driver (shared/tools/make-qemu-fixtures.sh) not available")
    text = driver.read_text()
    check = "        if not os.path.isfile(path):\n            raise LoadbackUsage"
    if check not in text:
        pytest.skip("the fixture driver checks its inputs in a way this test does not know")
    driver.write_text(text.replace(check, "        if not os.path.exists(path):\n            raise LoadbackUsage"))
    return driver


@pytest.mark.parametrize("keep", [1.0, 0.7, 0.999], ids=["whole", "cut-70%", "cut-last-bytes"])
def test_qemu_loads_the_stream_as_the_overlay_arrives(
    fixture_set: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, keep: float
) -> None:
    if (
        not (fixture_set / "manifest.json").exists()
        or json.loads((fixture_set / "manifest.json").read_text())["qemu_version"]["qemu"]["major"] >= 9
    ):
        pytest.skip("the primary capture is a QEMU 7.2 stream")
    driver = _stream_driver(tmp_path_factory)
    base, modified = fixture_set / "base.mem", fixture_set / "modified.mem"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    made = subprocess.run(
        [*VMDELTA, "create", "-q", "-o", "-", "--memory", str(base), str(modified), *cache],
        capture_output=True,
        timeout=300,
        check=True,
    )
    overlay = made.stdout[: int(len(made.stdout) * keep)]

    fifo = tmp_path / "memory.fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # opening it only for writing would wait for QEMU
    applier = subprocess.Popen(
        [*VMDELTA, "apply", "-q", "-", "--memory", str(base), "-", *cache],
        stdin=subprocess.PIPE,
        stdout=writer,
        stderr=subprocess.PIPE,
    )
    os.close(writer)

    def send() -> None:
        assert applier.stdin is not None
        with applier.stdin:
            applier.stdin.write(overlay)

    sender = threading.Thread(target=send)
    sender.start()
    loaded = subprocess.run(
        [
            sys.executable, str(driver), "loadback", str(fixture_set), "--tag", "modified",
            "--mem", str(fifo), "--timeout", "120",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    sender.join()
    assert applier.stderr is not None
    with applier.stderr:
        err = applier.stderr.read().decode()
    code = applier.wait(timeout=120)
    lines = [line for line in loaded.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result: {loaded.stderr[-2000:]}"
    result = json.loads(lines[-1])
    if loaded.returncode in (2, 3):
        pytest.skip(f"the load test could not run here: {result.get('error')}")
    if keep == 1.0:
        assert code == 0, err
        assert result["ok"], f"QEMU did not resume the streamed snapshot: {result.get('error')}"
        assert any("SHUTDOWN" in m for m in result["markers_seen"])
    else:
        assert code == 3 and "cut short" in err, err
        assert not result["ok"], "QEMU resumed from an overlay cut short"
