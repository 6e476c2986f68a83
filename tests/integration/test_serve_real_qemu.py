"""``vmdelta serve`` starting a real QEMU: the realistic VM's overlay is sent over loopback, the
server rebuilds its disk and streams its memory into ``qemu-system-x86_64 -incoming fd:0``, and
the guest resumes with its page cache and its files intact. An overlay cut short never starts it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixture_guest import RunningGuest, qemu_argv, stream_capture
from samples import running_server

from vmdelta_core.serve import OverlayServer, QemuLaunch, ServeConfig, ServedBase, send_overlay
from vmdelta_core.serve.protocol import CHUNK_FIELD, pack_hello, prologue_end, read_line

pytestmark = [pytest.mark.fixtures, pytest.mark.slow]

TOKEN = "a token for the cloudlet under test"
VMDELTA = [sys.executable, "-m", "vmdelta_core"]


@pytest.fixture(scope="module")
def overlay(realistic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The realistic VM (QEMU 7.2 memory stream + disk) as a stream-form overlay."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if not stream_capture(realistic):
        pytest.skip("the primary capture is not a QEMU 7.2 stream of the realistic guest")
    out = tmp_path_factory.mktemp("overlay") / "vm.vmds"
    f = realistic
    pairs = [
        "--memory",
        str(f / "base.mem"),
        str(f / "modified.mem"),
        "--disk",
        str(f / "base.img"),
        str(f / "modified.img"),
    ]
    with open(out, "wb") as sink:
        subprocess.run([*VMDELTA, "create", "-q", "-o", "-", *pairs], stdout=sink, check=True, timeout=600)
    return out


@pytest.fixture
def server(realistic: Path, tmp_path: Path) -> Iterator[OverlayServer]:
    """A server holding the realistic bases, starting the guest with its rebuilt disk."""
    vms = tmp_path / "vms"
    command = qemu_argv(realistic, f"{vms}/{{name}}", disk="{disk0}", incoming="fd:0")
    config = ServeConfig(
        output=tmp_path / "out",
        bases=[ServedBase("memory", realistic / "base.mem"), ServedBase("disk", realistic / "base.img")],
        token=TOKEN,
        port=0,
        timeout=60.0,
        threads=2,
        qemu=QemuLaunch(command),
    )
    with running_server(config) as server:
        yield server


def test_the_guest_resumes_from_an_overlay_sent_to_serve(overlay: Path, server: OverlayServer, tmp_path: Path) -> None:
    folder = tmp_path / "vms" / "vm1"
    folder.mkdir(parents=True)
    answer = send_overlay(overlay, *server.address, token=TOKEN, name="vm1", timeout=120)
    assert answer["status"] == "ok" and answer["vm"]["status"] == "started", answer
    # QEMU loads the stream, the guest checks its cached files against the disk's and powers off
    seen = RunningGuest(folder).resume(timeout=180)
    assert seen["loaded"] <= seen["running"] <= seen["checked"]


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_a_damaged_overlay_never_resumes_the_guest(
    overlay: Path, server: OverlayServer, tmp_path: Path, damage: str
) -> None:
    """The VM starts at once (its disk is rebuilt in place) and loads memory as it arrives; an
    overlay cut short, or with one byte changed, stops it before its memory stream ends."""
    data = bytearray(overlay.read_bytes())
    if damage == "cut":
        del data[len(data) * 7 // 10 :]
    else:
        data[len(data) * 6 // 10] ^= 0x10
    folder = tmp_path / "vms" / damage
    folder.mkdir(parents=True)
    # the damaged bytes go as they are (`vmdelta send` would refuse them before sending)
    head = prologue_end(bytes(data))
    with socket.create_connection(server.address, timeout=120) as sock:
        sock.sendall(pack_hello(TOKEN, damage) + CHUNK_FIELD.pack(head) + data[:head])
        assert read_line(sock)["status"] == "ready"
        with contextlib.suppress(OSError):  # the server may stop reading at the damage
            for start in range(head, len(data), 1 << 20):
                chunk = data[start : start + (1 << 20)]
                sock.sendall(CHUNK_FIELD.pack(len(chunk)) + chunk)
            sock.sendall(CHUNK_FIELD.pack(0))
        answer = read_line(sock)
    assert answer["status"] == "error", answer
    assert re.search("cut short" if damage == "cut" else "checksum|damaged|corrupt", answer["message"]), answer
    console = folder / "console.log"
    assert console.exists()  # QEMU had started, loading the memory as it came
    assert not _qemu_running(folder), "QEMU still runs after its overlay failed"
    assert "RESTORE_CHECK" not in console.read_text(errors="replace")  # the guest never ran
    assert not (server.config.output / damage).exists()


def _qemu_running(folder: Path) -> bool:
    """Whether a process started with ``folder`` in its command line is alive."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    return (proc / "stat").read_text().split(") ")[1][0] != "Z"
            except OSError:
                continue
    return False
