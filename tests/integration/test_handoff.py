"""``vmdelta handoff``: the realistic guest, running in a real QEMU, moved to a second QEMU on a
host that holds its base, over loopback. The destination resumes it and the guest goes on working
there (it checks its cached files against its disk); a wrong base is refused before anything
migrates, and a handoff that breaks off leaves the guest running where it was.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixture_guest import RunningGuest, qemu_argv, stream_capture
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmdelta_core.errors import BaseMismatchError, VmdeltaError
from vmdelta_core.handoff.session import BaseSpec, HandoffReceiver, ReceiveConfig
from vmdelta_core.handoff.source import SendConfig, hand_off
from vmdelta_core.registry import default_registry
from vmdelta_core.serve import QemuLaunch

pytestmark = [pytest.mark.fixtures, pytest.mark.slow]

TOKEN = "a token for the handoff under test"


def _split_live_available() -> bool:
    from vmdelta_core.registry import default_registry

    return hasattr(default_registry().source("qemu"), "split_live")


@pytest.fixture
def running(realistic: Path, tmp_path: Path) -> Iterator[dict]:
    """The realistic guest running in a source QEMU (resumed from its modified capture), its disk
    a copy both QEMUs use (shared storage)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if not stream_capture(realistic):
        pytest.skip("the primary capture is not a QEMU 7.2 stream of the realistic guest")
    if not _split_live_available():
        pytest.skip("the installed qemu source cannot split a live stream")
    disk = tmp_path / "shared.img"
    subprocess.run(["cp", "--sparse=always", str(realistic / "modified.img"), str(disk)], check=True)
    folder = tmp_path / "src"
    folder.mkdir()
    argv = qemu_argv(realistic, folder, disk=str(disk), incoming=f"exec:cat {realistic / 'modified.mem'}")
    vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        qmp = _monitor(folder / "qmp.sock")
        while qmp.cmd("query-status")["status"] == "inmigrate":
            time.sleep(0.05)
        qmp.cmd("cont")
        assert qmp.cmd("query-status")["status"] == "running"
        qmp.close()  # QEMU serves one monitor client at a time: the handoff's
        yield {"vm": vm, "folder": folder, "disk": disk, "monitor": lambda: _monitor(folder / "qmp.sock")}
    finally:
        vm.kill()
        vm.wait()
        if vm.stderr:
            vm.stderr.close()


def _monitor(path: Path) -> QEMUMonitorProtocol:
    for _ in range(600):
        qmp = QEMUMonitorProtocol(str(path))
        try:
            qmp.connect()
            return qmp
        except Exception:
            qmp.close()
            time.sleep(0.05)
    raise AssertionError(f"no QMP at {path}")


def _receiver(realistic: Path, tmp_path: Path, disk: Path, memory_base: Path | None = None) -> HandoffReceiver:
    folder = tmp_path / "dst"
    folder.mkdir(exist_ok=True)
    command = qemu_argv(realistic, folder, disk=str(disk), incoming="fd:0")
    config = ReceiveConfig(
        host="127.0.0.1",
        port=0,
        token=TOKEN,
        bases=(BaseSpec("memory", memory_base or realistic / "base.mem"), BaseSpec("disk", realistic / "base.img")),
        qemu=QemuLaunch(command),
        timeout=60,
    )
    return HandoffReceiver(config, default_registry())


def _send_config(realistic: Path, running: dict, address: tuple[str, int]) -> SendConfig:
    return SendConfig(
        qmp=running["folder"] / "qmp.sock",
        host=address[0],
        port=address[1],
        token=TOKEN,
        bases=(BaseSpec("memory", realistic / "base.mem"), BaseSpec("disk", realistic / "base.img")),
        name="vm1",
        parameters={"downtime-limit": 300},
    )


def test_the_guest_goes_on_working_at_the_destination(realistic: Path, running: dict, tmp_path: Path) -> None:
    with _receiver(realistic, tmp_path, running["disk"]) as receiver:
        answers: list[dict] = []
        thread = threading.Thread(target=lambda: answers.append(receiver.serve_one(time.monotonic() + 120)))
        thread.start()
        report = hand_off(_send_config(realistic, running, receiver.address))
        thread.join(120)
    assert answers and answers[0]["status"] == "ok", answers
    with contextlib.closing(running["monitor"]()) as qmp:
        assert qmp.cmd("query-status")["status"] == "postmigrate"
    relay = report.relay
    assert relay.passes >= 1 and relay.stream_bytes == answers[0]["stream_bytes"]
    # most of the guest's RAM is its base's: it travels as references
    assert relay.pages["base memory"] > relay.pages["raw"]
    assert relay.sent_bytes < relay.stream_bytes / 4
    seen = RunningGuest(tmp_path / "dst").resume(timeout=180)
    assert seen["checked"] >= seen["running"]


def test_a_wrong_base_is_refused_before_anything_migrates(realistic: Path, running: dict, tmp_path: Path) -> None:
    wrong = realistic / "modified.mem"  # not the base the source relays against
    with contextlib.closing(running["monitor"]()) as qmp:
        before = qmp.cmd("query-migrate")  # the load of the capture this guest was resumed from
    with _receiver(realistic, tmp_path, running["disk"], memory_base=wrong) as receiver:
        refused: list[BaseException] = []

        def receive() -> None:
            try:
                receiver.serve_one(time.monotonic() + 60)
            except BaseMismatchError as exc:
                refused.append(exc)

        thread = threading.Thread(target=receive)
        thread.start()
        with pytest.raises(BaseMismatchError, match="holds no memory base"):
            hand_off(_send_config(realistic, running, receiver.address))
        thread.join(60)
    assert refused, "the destination did not refuse the handoff"
    assert not list((tmp_path / "dst").glob("qmp.sock"))  # no QEMU was started there
    with contextlib.closing(running["monitor"]()) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"
        assert qmp.cmd("query-migrate") == before  # no migration was even started


def test_a_broken_link_leaves_the_guest_running_at_the_source(realistic: Path, running: dict, tmp_path: Path) -> None:
    """The destination goes away mid-stream: the migration is cancelled, the guest runs on."""
    import socket

    from vmdelta_core.serve.protocol import MAGIC, answer_line, recv_exactly

    with socket.create_server(("127.0.0.1", 0)) as server:

        def take_some_then_break() -> None:
            conn, _ = server.accept()
            with conn:
                recv_exactly(conn, len(MAGIC) + 4, "the hello's head")
                conn.recv(1 << 16)
                conn.sendall(answer_line({"status": "ready"}))
                recv_exactly(conn, 2 << 20, "some of the relay")

        thread = threading.Thread(target=take_some_then_break)
        thread.start()
        with pytest.raises(VmdeltaError):
            hand_off(_send_config(realistic, running, server.getsockname()[:2]))
        thread.join(30)
    with contextlib.closing(running["monitor"]()) as qmp:
        for _ in range(100):
            if qmp.cmd("query-migrate").get("status") in ("cancelled", "failed"):
                break
            time.sleep(0.05)
        assert qmp.cmd("query-status")["status"] == "running"


def test_the_command_line_says_what_each_side_needs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmdelta_core", "handoff", "receive", "--memory-base", "x.mem"],
        capture_output=True,
        text=True,
        env={"VMDELTA_TOKEN": "t", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and done.stderr.startswith("vmdelta: error: give the VM's command after --")
