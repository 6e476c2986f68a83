"""``vmdelta handoff``: the realistic guest, running in a real QEMU, moved to a second QEMU on a
host that holds its base, over loopback. The destination resumes it and the guest goes on working
there (it checks its cached files against its disk); a wrong base is refused before anything
migrates, and a handoff that breaks off leaves the guest running where it was. With its disk
moved too: the guest runs from a qcow2 overlay over the base disk, the drive is written during
the handoff, and the destination's new qcow2 holds every write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from fixture_guest import RunningGuest, qemu_argv, stream_capture
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmdelta_core.errors import BaseMismatchError, VmdeltaError
from vmdelta_core.handoff.nbd import NbdClient, NbdError
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
    with _resumed(argv, folder / "qmp.sock") as (vm, qmp):
        assert qmp.cmd("query-status")["status"] == "running"
        qmp.close()  # QEMU serves one monitor client at a time: the handoff's
        yield {"vm": vm, "folder": folder, "disk": disk, "monitor": lambda: _monitor(folder / "qmp.sock")}


@contextlib.contextmanager
def _resumed(argv: list[str], monitor: Path) -> Iterator[tuple[subprocess.Popen, QEMUMonitorProtocol]]:
    """QEMU started with ``argv``, its incoming load finished and the guest continued; killed
    afterwards."""
    vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        qmp = _monitor(monitor)
        while qmp.cmd("query-status")["status"] == "inmigrate":
            time.sleep(0.05)
        qmp.cmd("cont")
        yield vm, qmp
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


def _receiver(
    realistic: Path,
    tmp_path: Path,
    disk: Path | str,
    memory_base: Path | None = None,
    *,
    moved: Path | None = None,
    disk_base: Path | None = None,
) -> HandoffReceiver:
    folder = tmp_path / "dst"
    folder.mkdir(exist_ok=True)
    command = qemu_argv(realistic, folder, disk=str(disk), incoming="fd:0")
    if moved is not None:
        command = [arg.replace("format=raw", "format=qcow2") for arg in command]
    config = ReceiveConfig(
        host="127.0.0.1",
        port=0,
        token=TOKEN,
        bases=(
            BaseSpec("memory", memory_base or realistic / "base.mem"),
            BaseSpec("disk", disk_base or realistic / "base.img"),
        ),
        qemu=QemuLaunch(command),
        timeout=60,
        disk=moved,
    )
    return HandoffReceiver(config, default_registry())


def _send_config(realistic: Path, running: dict, address: tuple[str, int], *, move_disk: bool = False) -> SendConfig:
    return SendConfig(
        qmp=running["folder"] / "qmp.sock",
        host=address[0],
        port=address[1],
        token=TOKEN,
        bases=(BaseSpec("memory", realistic / "base.mem"), BaseSpec("disk", realistic / "base.img")),
        name="vm1",
        parameters={"downtime-limit": 300},
        move_disk=move_disk,
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


def _refused(receiver: HandoffReceiver, config: SendConfig, match: str) -> list[BaseException]:
    """Hand off to ``receiver``, which must refuse (``match``ing its reason); what it raised."""
    refused: list[BaseException] = []

    def receive() -> None:
        try:
            receiver.serve_one(time.monotonic() + 60)
        except BaseMismatchError as exc:
            refused.append(exc)

    thread = threading.Thread(target=receive)
    thread.start()
    with pytest.raises(BaseMismatchError, match=match):
        hand_off(config)
    thread.join(60)
    return refused


def test_a_wrong_base_is_refused_before_anything_migrates(realistic: Path, running: dict, tmp_path: Path) -> None:
    wrong = realistic / "modified.mem"  # not the base the source relays against
    with contextlib.closing(running["monitor"]()) as qmp:
        before = qmp.cmd("query-migrate")  # the load of the capture this guest was resumed from
    with _receiver(realistic, tmp_path, running["disk"], memory_base=wrong) as receiver:
        refused = _refused(receiver, _send_config(realistic, running, receiver.address), "holds no memory base")
    assert refused, "the destination did not refuse the handoff"
    assert not list((tmp_path / "dst").glob("qmp.sock"))  # no QEMU was started there
    with contextlib.closing(running["monitor"]()) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"
        assert qmp.cmd("query-migrate") == before  # no migration was even started


@contextlib.contextmanager
def _breaking_destination(take: int) -> Iterator[tuple[str, int]]:
    """The address of a destination that says ``ready``, takes ``take`` bytes of the relay and
    goes away."""
    import socket

    from vmdelta_core.serve.protocol import MAGIC, answer_line, recv_exactly

    with socket.create_server(("127.0.0.1", 0)) as server:

        def take_some_then_break() -> None:
            conn, _ = server.accept()
            with conn:
                recv_exactly(conn, len(MAGIC) + 4, "the hello's head")
                conn.recv(1 << 16)
                conn.sendall(answer_line({"status": "ready"}))
                recv_exactly(conn, take, "some of the relay")

        thread = threading.Thread(target=take_some_then_break)
        thread.start()
        try:
            yield server.getsockname()[:2]
        finally:
            thread.join(30)


def test_a_broken_link_leaves_the_guest_running_at_the_source(realistic: Path, running: dict, tmp_path: Path) -> None:
    """The destination goes away mid-stream: the migration is cancelled, the guest runs on."""
    with _breaking_destination(2 << 20) as address, pytest.raises(VmdeltaError):
        hand_off(_send_config(realistic, running, address))
    with contextlib.closing(running["monitor"]()) as qmp:
        for _ in range(100):
            if qmp.cmd("query-migrate").get("status") in ("cancelled", "failed"):
                break
            time.sleep(0.05)
        assert qmp.cmd("query-status")["status"] == "running"


def test_the_command_line_says_what_each_side_needs() -> None:
    receive = [sys.executable, "-m", "vmdelta_core", "handoff", "receive", "--memory-base", "x.mem"]
    done = subprocess.run(
        receive,
        capture_output=True,
        text=True,
        env={"VMDELTA_TOKEN": "t", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and done.stderr.startswith("vmdelta: error: give the VM's command after --")
    vm = ["qemu-system-x86_64", "-drive", "file=vm1.qcow2", "-incoming", "fd:0"]
    done = subprocess.run(
        [*receive, "--disk-base", "x.img", "--disk", "vm1.qcow2", "--", *vm],
        capture_output=True,
        text=True,
        env={"VMDELTA_TOKEN": "t", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and "must name the moved disk: {disk0}" in done.stderr


# ------------------------------------------------------------------------------------------------
# the disk moves too
# ------------------------------------------------------------------------------------------------

CLUSTER = 64 << 10


@pytest.fixture
def moving(realistic: Path, tmp_path: Path) -> Iterator[dict]:
    """The realistic guest running from a qcow2 overlay over the base disk that holds the clusters
    its disk changed since the base (the cloudlet convention); a second monitor for the test."""
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-system-x86_64 or qemu-nbd is not installed")
    if not stream_capture(realistic) or not _split_live_available():
        pytest.skip("the primary capture is not a QEMU 7.2 stream, or the qemu source cannot split one")
    overlay = tmp_path / "src.qcow2"
    _overlay(realistic, overlay)
    folder = tmp_path / "src"
    folder.mkdir()
    argv = qemu_argv(realistic, folder, disk=str(overlay), incoming=f"exec:cat {realistic / 'modified.mem'}")
    argv = [arg.replace("format=raw", "format=qcow2") for arg in argv]
    argv += ["-qmp", f"unix:{folder}/test.sock,server=on,wait=off"]
    with _resumed(argv, folder / "test.sock") as (vm, qmp):
        loaded = qmp.cmd("query-migrate")  # the load of the capture the guest was resumed from
        yield {"vm": vm, "folder": folder, "overlay": overlay, "test": qmp, "loaded": loaded}
        qmp.close()


def _overlay(realistic: Path, path: Path) -> None:
    """A qcow2 over ``base.img`` holding the clusters in which ``modified.img`` differs from it."""
    import numpy as np

    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(realistic / "base.img"), "-F", "raw", str(path)],
        check=True,
    )
    base = np.fromfile(realistic / "base.img", dtype=np.uint8).reshape(-1, CLUSTER)
    modified = np.fromfile(realistic / "modified.img", dtype=np.uint8).reshape(-1, CLUSTER)
    sock = path.with_suffix(".sock")
    server = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(path)])
    try:
        with _nbd(sock) as client:
            for n in np.flatnonzero((base != modified).any(axis=1)).tolist():
                client.write(n * CLUSTER, modified[n].tobytes())
            client.flush()
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _nbd(sock: Path) -> NbdClient:
    for _ in range(1000):
        with contextlib.suppress(NbdError):
            return NbdClient(sock, "")
        time.sleep(0.01)
    raise AssertionError(f"qemu-nbd does not answer at {sock}")


def _free_clusters(realistic: Path, count: int) -> list[int]:
    """Offsets of the last ``count`` clusters that are zero in both disks: space the guest's file
    system does not use, which the test may write without harming the guest's files."""
    import numpy as np

    zero = np.ones(os.path.getsize(realistic / "base.img") // CLUSTER, dtype=bool)
    for name in ("base.img", "modified.img"):
        zero &= ~np.fromfile(realistic / name, dtype=np.uint8).reshape(-1, CLUSTER).any(axis=1)
    return [int(n) * CLUSTER for n in np.flatnonzero(zero)[-count:]]


def _write(qmp: QEMUMonitorProtocol, offset: int, pattern: int) -> None:
    """A write to the guest's drive through QEMU's block layer, as the guest's own would go."""
    said = qmp.cmd("human-monitor-command", **{"command-line": f'qemu-io disk0 "write -P {pattern} {offset} 64k"'})
    assert not said.strip(), said


def test_the_disk_moves_with_the_guest(
    realistic: Path, moving: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write made while memory migrates is in no pass but the last, sent once QEMU stopped
    the guest (passes between memory's are left out here; tests/integration/test_handoff_drive.py
    has them)."""
    from vmdelta_core.handoff import source

    monkeypatch.setattr(source, "_DISK_PASS_SECONDS", float("inf"))
    before, during = _free_clusters(realistic, 2)
    _write(moving["test"], before, 0x5A)  # in the overlay before the handoff: its first pass
    written: list[int] = []

    def write_during(stats, qemu) -> None:
        if qemu and not written:  # QEMU is migrating memory: only the dirty bitmap knows of this write
            _write(moving["test"], during, 0x5B)
            written.append(during)

    moved = tmp_path / "dst" / "vm1.qcow2"
    with _receiver(realistic, tmp_path, "{disk0}", moved=moved) as receiver:
        answers: list[dict] = []
        thread = threading.Thread(target=lambda: answers.append(receiver.serve_one(time.monotonic() + 120)))
        thread.start()
        report = hand_off(_send_config(realistic, moving, receiver.address, move_disk=True), on_progress=write_during)
        thread.join(120)
    assert answers and answers[0]["status"] == "ok", answers
    assert written and moving["test"].cmd("query-status")["status"] == "postmigrate"
    first, last = report.relay.disk_passes
    assert first.bytes >= 39 << 20  # the overlay's clusters
    assert last.blocks == 16  # the cluster written during the handoff, once the guest stopped
    assert answers[0]["disk"]["blocks"] == first.blocks + last.blocks
    subprocess.run(["qemu-img", "check", "-U", str(moved)], check=True, capture_output=True)
    same = subprocess.run(
        ["qemu-img", "compare", "-U", str(moving["overlay"]), str(moved)], capture_output=True, text=True
    )
    assert same.returncode == 0, same.stdout + same.stderr
    assert _holds(moved, before, 0x5A) and _holds(moved, during, 0x5B)
    assert not _holds(moved, during, 0x5A)
    seen = RunningGuest(tmp_path / "dst").resume(timeout=180)  # its files, read from the moved disk
    assert seen["checked"] >= seen["running"]


def _holds(path: Path, offset: int, pattern: int) -> bool:
    """Whether the qcow2 at ``path`` shows the guest a cluster of ``pattern`` at ``offset``."""
    done = subprocess.run(
        ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern} {offset} 64k", str(path)],
        capture_output=True,
        text=True,
    )
    assert "read 65536/65536" in done.stdout, done.stdout + done.stderr
    return done.returncode == 0 and "verification failed" not in done.stdout


def test_a_wrong_base_disk_is_refused_before_the_disk_moves(realistic: Path, moving: dict, tmp_path: Path) -> None:
    moved = tmp_path / "dst" / "vm1.qcow2"
    wrong = realistic / "modified.img"
    with _receiver(realistic, tmp_path, "{disk0}", moved=moved, disk_base=wrong) as receiver:
        config = _send_config(realistic, moving, receiver.address, move_disk=True)
        refused = _refused(receiver, config, "holds no disk base")
    assert refused and not moved.exists()
    qmp = moving["test"]
    assert qmp.cmd("query-status")["status"] == "running"
    assert qmp.cmd("query-migrate") == moving["loaded"]  # none was even started
    assert not any(d.get("dirty-bitmaps") for d in qmp.cmd("query-block"))


def test_a_link_broken_while_the_disk_moves_leaves_the_guest_running(
    realistic: Path, moving: dict, tmp_path: Path
) -> None:
    """The destination goes away while the overlay's clusters go: nothing was migrated, and the
    drive is as it was (no bitmap, no export)."""
    with _breaking_destination(1 << 20) as address, pytest.raises(VmdeltaError):
        hand_off(_send_config(realistic, moving, address, move_disk=True))
    qmp = moving["test"]
    assert qmp.cmd("query-status")["status"] == "running"
    assert qmp.cmd("query-migrate") == moving["loaded"]  # broken before the migration started
    assert not any(d.get("dirty-bitmaps") for d in qmp.cmd("query-block"))
    assert qmp.cmd("query-block-exports") == []
    _write(qmp, _free_clusters(realistic, 1)[0], 0x5C)  # the drive is the guest's alone again


def test_a_destination_failing_after_the_disk_came_leaves_no_disk_and_the_guest_running(
    realistic: Path, moving: dict, tmp_path: Path
) -> None:
    """The destination's QEMU dies before it takes the stream: the disk it had been given is
    removed, and the source's migration, already under way, is cancelled."""
    moved = tmp_path / "dst" / "vm1.qcow2"
    with _receiver(realistic, tmp_path, "{disk0}", moved=moved) as receiver:
        receiver.config = attrs.evolve(receiver.config, qemu=QemuLaunch([*receiver.config.qemu.command, "-no-such"]))
        failed: list[BaseException] = []

        def receive() -> None:
            try:
                receiver.serve_one(time.monotonic() + 60)
            except VmdeltaError as exc:
                failed.append(exc)

        thread = threading.Thread(target=receive)
        thread.start()
        with pytest.raises(VmdeltaError, match="destination"):
            hand_off(_send_config(realistic, moving, receiver.address, move_disk=True))
        thread.join(60)
    assert failed and not moved.exists()
    qmp = moving["test"]
    for _ in range(100):
        if qmp.cmd("query-migrate").get("status") == "cancelled":
            break
        time.sleep(0.05)
    assert qmp.cmd("query-migrate")["status"] == "cancelled"
    assert qmp.cmd("query-status")["status"] == "running"
    assert not any(d.get("dirty-bitmaps") for d in qmp.cmd("query-block"))
    assert qmp.cmd("query-block-exports") == []
