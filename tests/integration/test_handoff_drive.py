"""The source's side of a moved disk on a real QEMU (no guest: a drive written through QEMU's own
block layer): the drive is found by its backing file, the overlay's clusters are read through
QEMU, each later pass reads exactly what was written since the one before, and closing leaves the
drive without bitmap or export.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmdelta_core.errors import ConfigError
from vmdelta_core.handoff.disk import DriveExport, find_drive

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None, reason="QEMU is not installed"
)

SIZE, CLUSTER = 1 << 20, 64 << 10


@pytest.fixture
def drive(tmp_path: Path) -> Iterator[tuple[QEMUMonitorProtocol, Path]]:
    """A QEMU holding ``disk0``, a qcow2 over a random raw base, and its monitor."""
    base = tmp_path / "base.img"
    base.write_bytes(np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    overlay = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)], check=True)
    sock = tmp_path / "qmp.sock"
    qemu = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
    vm = subprocess.Popen(
        [*qemu, "-drive", f"file={overlay},format=qcow2,if=none,id=disk0", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        qmp = _monitor(sock)
        with contextlib.closing(qmp):
            yield qmp, base
    finally:
        vm.kill()
        vm.wait()


def _monitor(sock: Path) -> QEMUMonitorProtocol:
    for _ in range(500):
        qmp = QEMUMonitorProtocol(str(sock))
        try:
            qmp.connect()
            return qmp
        except Exception:
            qmp.close()
            time.sleep(0.02)
    raise AssertionError("QEMU's monitor does not answer")


def _write(qmp: QEMUMonitorProtocol, offset: int, pattern: int) -> None:
    said = qmp.cmd("human-monitor-command", **{"command-line": f'qemu-io disk0 "write -P {pattern} {offset} 4k"'})
    assert not said.strip(), said


def _clusters(blocks: Iterator[tuple[int, bytes]]) -> dict[int, bytes]:
    return {offset: data for offset, data in blocks}


def test_each_pass_reads_what_was_written_since_the_one_before(drive) -> None:
    qmp, base = drive
    original = base.read_bytes()
    _write(qmp, CLUSTER, 1)  # before the handoff: in the overlay
    found = find_drive(qmp, None, base)
    assert found["name"] == "disk0" and found["size"] == SIZE
    export = DriveExport(qmp, found["node"])
    try:
        first = _clusters(export.allocated())
        assert list(first) == [CLUSTER]
        assert first[CLUSTER] == bytes([1]) * 4096 + original[CLUSTER + 4096 : 2 * CLUSTER]
        _write(qmp, 4 * CLUSTER, 2)
        second = _clusters(export.written())
        assert list(second) == [4 * CLUSTER] and second[4 * CLUSTER][:4096] == bytes([2]) * 4096
        _write(qmp, 8 * CLUSTER + 4096, 3)
        last = _clusters(export.dirtied())
        assert list(last) == [8 * CLUSTER] and last[8 * CLUSTER][4096:8192] == bytes([3]) * 4096
    finally:
        export.close()
    assert not any(d.get("dirty-bitmaps") for d in qmp.cmd("query-block"))
    assert qmp.cmd("query-block-exports") == []


def test_a_drive_over_another_base_is_refused(drive, tmp_path: Path) -> None:
    qmp, _ = drive
    other = tmp_path / "other.img"
    other.write_bytes(bytes(SIZE))
    with pytest.raises(ConfigError, match="not by the base disk"):
        find_drive(qmp, None, other)
    with pytest.raises(ConfigError, match="no drive 'disk9'"):
        find_drive(qmp, "disk9", other)
