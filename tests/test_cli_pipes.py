"""Pipes around ``vmdelta apply -``. With ``--memory BASE FIFO`` the memory artifact streams into
a named pipe (what QEMU's ``-incoming "exec:cat FIFO"`` reads) as the overlay arrives, its end only
once everything is verified; the disks are written as files."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from samples import vm_overlays

VMDELTA = [sys.executable, "-m", "vmdelta_core"]


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return vm_overlays(tmp_path_factory.mktemp("vm"), seed=11, memory_units=600)


def _apply_into_fifo(vm: dict[str, Path], overlay: bytes, folder: Path) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run apply with its memory output a FIFO read by a thread, as QEMU would; what it read."""
    fifo = folder / "memory.fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def read() -> None:
        with open(fifo, "rb") as reader:
            while chunk := reader.read(1 << 16):
                got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    done = subprocess.run(
        [*VMDELTA, "apply", "-", "--memory", str(vm["memory_base"]), str(fifo),
         "--disk", str(vm["disk_base"]), str(folder / "disk.out"), "--cache-dir", str(vm["cache"])],
        input=overlay, capture_output=True, timeout=120,
    )  # fmt: skip
    reader.join(60)
    return done, bytes(got)


def test_the_memory_artifact_streams_into_a_fifo(vm, tmp_path: Path) -> None:
    done, got = _apply_into_fifo(vm, vm["stream_form"].read_bytes(), tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert got == vm["memory"].read_bytes()
    assert (tmp_path / "disk.out").read_bytes() == vm["disk"].read_bytes()
    assert "memory.fifo" in done.stdout.decode()  # the report names the FIFO, not standard output


def test_a_damaged_overlay_never_ends_the_fifo_stream(vm, tmp_path: Path) -> None:
    damaged = bytearray(vm["stream_form"].read_bytes())
    damaged[len(damaged) * 2 // 3] ^= 0x01
    done, got = _apply_into_fifo(vm, bytes(damaged), tmp_path)
    assert done.returncode != 0 and done.stderr.decode().count("\n") == 1, done.stderr.decode()
    memory = vm["memory"].read_bytes()
    assert len(got) < len(memory) and memory.startswith(got)  # the reader saw the stream stop short
    assert not (tmp_path / "disk.out").exists()
    assert stat_is_fifo(tmp_path / "memory.fifo")  # never replaced by a file


def stat_is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_an_error_while_the_stream_still_flows_is_one_line(vm, tmp_path: Path) -> None:
    """apply stops at an error found after its prologue (here: the disk pair is missing) while
    the sender has not closed the pipe, so a thread of apply still waits on standard input: the
    command still ends with its one line and status, never an interpreter abort."""
    stream = vm["stream_form"].read_bytes()
    applier = subprocess.Popen(
        [*VMDELTA, "apply", "-", "--memory", str(vm["memory_base"]), str(tmp_path / "memory.out")],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert applier.stdin is not None and applier.stderr is not None
    applier.stdin.write(stream[: len(stream) // 2])  # and the pipe stays open
    applier.stdin.flush()
    with applier.stderr:
        err = applier.stderr.read().decode()
    code = applier.wait(60)
    applier.stdin.close()
    assert code == 2 and err.count("\n") == 1 and "--disk" in err, (code, err)
    assert not (tmp_path / "memory.out").exists()
