#!/usr/bin/env python3
"""Live handoff of a working guest over a shaped link: `vmdelta handoff` against QEMU's own.

Two network namespaces joined by a veth pair, the sender's egress shaped by tc's token bucket
filter (``bench/resume.py``'s link). On the sending side a real ``qemu-system-x86_64`` resumes
the realistic guest from its base snapshot, with its disk a qcow2 overlay over the base disk
(the cloudlet convention); the guest is told to run its workload (reading, editing, archiving,
sorting, filling and freeing memory, writing and trimming its disk), and the handoff starts as
the workload begins, so the guest writes memory and disk while it moves. Once the workload is
done the guest keeps answering lines on its control serial (its init reads each and echoes it
on its console, forking as it goes) until it is told to check its files on the destination.

* ``vmdelta handoff``: ``vmdelta handoff send`` to ``vmdelta handoff receive``, which starts the
  destination's QEMU (``-incoming fd:0``); the disk is shared storage unless the command moves
  it (the run says which);
* ``QEMU multifd+zstd``: QEMU's precopy with multifd and ``multifd-compression=zstd``;
* ``QEMU xbzrle``: QEMU's precopy with xbzrle.

For both QEMU contenders the disk is moved as libvirt moves it: ``blockdev-mirror`` sync=top
from the source's overlay onto an NBD export of the destination's own qcow2 over the base,
the migration started once the mirror is ready, paused before switchover
(``pause-before-switchover``) while the mirror is completed, then continued.

Measured for each: total time (from the first byte of the handoff until the destination's QEMU
runs the guest), QEMU's own downtime (``query-migrate``), the guest-measured downtime, bytes on
the wire (the sender's veth, both directions), the guest's work going on at the destination (it
finishes its workload there if it had not, answers its control serial, and checks its files
against its disk and page cache: ``RESTORE_CHECK_OK``) and ``qemu-img check`` of the disk the
destination ran on.

Guest-measured downtime: each line the guest prints carries its uptime, which under QEMU runs
only while the VM runs; the host stamps each line as it appears. Host time minus guest uptime
is a constant while the VM runs and grows by exactly the time it was stopped, so its jump
between the source's console and the destination's is the downtime the guest lived through
(the smallest difference on each side is taken, the one printed with the least delay). Checked
against a known pause: the VM stopped over QMP for 2.002 s moved it by 2.007 s (lines jitter by
about 10 ms, the resolution of the guest's uptime).

Needs root (``ip netns``, ``tc``), ``qemu-system-x86_64``, ``qemu-img`` and the realistic
fixtures (a QEMU 7.2 capture)::

    sudo python bench/handoff.py                         # 25 and 10 Mbit/s, one run each
    sudo python bench/handoff.py --rates 25 --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# the guest driver the integration tests use; bench/ only once qemu.qmp is in, as its qemu.py
# would hide that namespace package
sys.path[0] = str(BENCH.parent / "tests" / "integration")
from fixture_guest import qemu_argv, stream_capture  # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

sys.path.append(str(BENCH))
from resume import CLOUDLET_IP, Link  # noqa: E402

VMDELTA = [sys.executable, "-m", "vmdelta_core"]
HANDOFF_PORT, MIGRATION_PORT, NBD_PORT = 7480, 4444, 10809
WORK_PREFIX, NETNS_PREFIX = "vmdelta-handoff-", "vmh-"
#: QEMU's migration parameters every contender gets (QEMU 7.2's defaults, said out loud)
DOWNTIME_LIMIT_MS = 300
#: a precopy that has not converged by then is cancelled (and reported so)
MIGRATION_LIMIT_S = 900
_UPTIME = re.compile(r"@@FIXTURE ([A-Z_]+)[^@]*? uptime=([0-9.]+)")


# ------------------------------------------------------------------------------------------------
# the link, the VMs and the guest
# ------------------------------------------------------------------------------------------------


class HandoffLink(Link):
    """resume.py's link under names of this benchmark's own, which a later run recognises."""

    def __init__(self, mbit: float) -> None:
        super().__init__(mbit)
        tag = f"{os.getpid() % 100000}"
        self.sender, self.cloudlet = f"{NETNS_PREFIX}snd-{tag}", f"{NETNS_PREFIX}cld-{tag}"
        self._ends = (f"vmhS{tag}", f"vmhC{tag}")

    def wire_bytes(self) -> int:
        """Bytes the sender's end of the veth has sent and received so far."""
        done = subprocess.run(
            ["ip", "-n", self.sender, "-s", "-j", "link", "show", "dev", self._ends[0]],
            capture_output=True,
            text=True,
            check=True,
        )
        stats = json.loads(done.stdout)[0]["stats64"]
        return int(stats["tx"]["bytes"]) + int(stats["rx"]["bytes"])


def clean_leftovers() -> None:
    """Namespaces and QEMUs a killed earlier run of this benchmark left behind."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
        if name.startswith(NETNS_PREFIX) and not _alive(int(name.rsplit("-", 1)[1])):
            subprocess.run(["ip", "netns", "del", name], check=False)
    for pidfile in glob.glob(f"{tempfile.gettempdir()}/{WORK_PREFIX}*/run*/*/qemu.pid"):
        _kill_pidfile(Path(pidfile))
    for folder in glob.glob(f"{tempfile.gettempdir()}/{WORK_PREFIX}*"):
        if not _alive(int(folder.rsplit("-", 1)[1])):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process whose pid ends in ``pid`` (pid modulo 100000, as the names hold) runs."""
    return any(int(p) % 100000 == pid for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid())


def _kill_pidfile(pidfile: Path) -> None:
    """Kill the QEMU a pidfile names, if it is still the QEMU of that folder."""
    with contextlib.suppress(ValueError, OSError):
        pid = int(pidfile.read_text())
        if str(pidfile.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, 9)


def monitor(path: Path, timeout: float = 60.0) -> QEMUMonitorProtocol:
    """QEMU's monitor at ``path``, once it listens."""
    deadline = time.monotonic() + timeout
    while True:
        qmp = QEMUMonitorProtocol(str(path))
        try:
            qmp.connect()
            return qmp
        except Exception:
            with contextlib.suppress(Exception):
                qmp.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"no QEMU monitor at {path}") from None
            time.sleep(0.02)


def control(folder: Path, timeout: float = 60.0) -> socket.socket:
    """The guest's control serial (its second serial port) in ``folder``."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(folder / "ctl.sock"))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"no control serial at {folder}") from None
            time.sleep(0.02)


def running_after(qmp: QEMUMonitorProtocol, timeout: float) -> float:
    """Wait for QEMU to run its guest; the time it was first seen running."""
    deadline = time.monotonic() + timeout
    while (status := qmp.cmd("query-status")["status"]) != "running":
        if status not in ("inmigrate", "paused", "prelaunch", "finish-migrate") or time.monotonic() > deadline:
            raise SystemExit(f"the destination's VM is {status}")
        time.sleep(0.005)
    return time.monotonic()


class Consoles:
    """The guest's console on each host, line by line, each line stamped with the host's clock
    when it appeared (the files are read every 5 ms)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.lines: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        offsets = dict.fromkeys(self.files, 0)
        partial = dict.fromkeys(self.files, b"")
        while not self._stop.wait(0.005):
            for side, path in self.files.items():
                try:
                    with open(path, "rb") as f:
                        f.seek(offsets[side])
                        data = f.read()
                except FileNotFoundError:
                    continue
                if not data:
                    continue
                now = time.monotonic()
                offsets[side] += len(data)
                *done, partial[side] = (partial[side] + data).split(b"\n")
                self.lines.extend((now, side, line.decode(errors="replace")) for line in done)

    def seen(self, marker: str, side: str | None = None) -> float | None:
        """When a line holding ``@@FIXTURE marker`` first appeared (on ``side``), else None."""
        for at, where, line in list(self.lines):
            if f"@@FIXTURE {marker}" in line and side in (None, where):
                return at
        return None

    def wait(self, marker: str, timeout: float, side: str | None = None) -> float:
        deadline = time.monotonic() + timeout
        while (at := self.seen(marker, side)) is None:
            failed = self.seen("FAIL")
            if failed is not None or time.monotonic() > deadline:
                tail = "\n".join(line for _, _, line in self.lines[-5:])
                raise SystemExit(f"the guest did not print {marker} ({side or 'either side'}):\n{tail}")
            time.sleep(0.01)
        return at

    def clock_offset(self, side: str) -> tuple[float, int] | None:
        """Host time minus guest uptime on ``side`` (its smallest, the line printed with the least
        delay) and how many lines told it."""
        found = [at - float(m.group(2)) for at, where, line in list(self.lines) if where == side
                 for m in [_UPTIME.search(line)] if m]  # fmt: skip
        return (min(found), len(found)) if found else None

    def silence(self) -> float | None:
        """Seconds between the source's last line and the destination's first."""
        last = max((at for at, side, _ in self.lines if side == "source"), default=None)
        first = min((at for at, side, _ in self.lines if side == "destination"), default=None)
        return first - last if last is not None and first is not None else None


class Pinger:
    """Keeps the guest at work once its workload is done: a line every 20 ms on its control
    serial, which its init reads and echoes on its console (a few processes per line). Aimed at
    the source, then at the destination once that runs; lines the serial cannot take are dropped."""

    def __init__(self, consoles: Consoles) -> None:
        self.consoles = consoles
        self.target: socket.socket | None = None
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ping, daemon=True)
        self._thread.start()

    def aim(self, sock: socket.socket | None) -> None:
        if sock is not None:
            sock.setblocking(False)
        self.target = sock

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _ping(self) -> None:
        while not self._stop.wait(0.02):
            target = self.target
            if target is None or self.consoles.seen("MARKER_B") is None:
                continue
            with contextlib.suppress(OSError):
                target.send(f"ping {self.sent}\n".encode())
                self.sent += 1


# ------------------------------------------------------------------------------------------------
# the contenders
# ------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, fixtures: Path, work: Path) -> None:
        self.fixtures, self.work = fixtures, work
        self.cache = work / "cache"
        self.env = {**os.environ, "VMDELTA_CACHE_DIR": str(self.cache)}
        self.runs = 0
        #: the QEMUs this run started itself, reaped when it ends
        self.children: list[subprocess.Popen[bytes]] = []
        self.token = work / "token"
        self.token.write_text("a token for the benchmark\n")
        self.disk_flags = disk_transfer_flags()
        self.send_with = "cli"

    def index_bases(self) -> None:
        """Index the bases once, before any clock runs (both hosts keep their index)."""
        from vmdelta_core.handoff.session import BaseSpec, open_bases
        from vmdelta_core.registry import default_registry

        specs = [BaseSpec("memory", self.fixtures / "base.mem"), BaseSpec("disk", self.fixtures / "base.img")]
        for lookup in (True, False):
            open_bases(specs, default_registry(), self.cache, lookup=lookup).close()

    def vm_argv(self, folder: Path, disk: Path, incoming: str) -> list[str]:
        """The fixture's command line, its drive a qcow2 overlay, a pidfile in ``folder``."""
        argv = qemu_argv(self.fixtures, folder, disk=str(disk), incoming=incoming)
        argv = [arg.replace("format=raw", "format=qcow2") if arg.startswith("file=") else arg for arg in argv]
        return [*argv, "-pidfile", str(folder / "qemu.pid")]

    def overlay(self, path: Path) -> Path:
        base = self.fixtures / "base.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(path)], check=True)
        return path

    def run(self, name: str, link: HandoffLink, move: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        """One handoff of the working guest with contender ``move``; its figures."""
        self.runs += 1
        folder = self.work / f"run{self.runs}"
        src, dst = folder / "src", folder / "dst"
        src.mkdir(parents=True)
        dst.mkdir()
        consoles = Consoles({"source": src / "console.log", "destination": dst / "console.log"})
        pinger = Pinger(consoles)
        self.children.append(
            subprocess.Popen(
                link.on_sender(
                    self.vm_argv(src, self.overlay(src / "disk.qcow2"), f"exec:cat {self.fixtures / 'base.mem'}")
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        ticker = None
        try:
            with contextlib.closing(monitor(src / "qmp.sock")) as qmp:
                while qmp.cmd("query-status")["status"] == "inmigrate":
                    time.sleep(0.02)
                qmp.cmd("cont")
            source_ctl = control(src)
            source_ctl.sendall(b"GO A\n")
            consoles.wait("WORKLOAD_BEGIN", 60, "source")
            pinger.aim(source_ctl)
            before, started = link.wire_bytes(), time.monotonic()
            ticker = _Ticker(name, link, started, before)
            figures = move(link, src, dst, started)
            ticker.stop()
            figures["wire_bytes"] = link.wire_bytes() - before
            if "mirror_bytes" in figures:  # QEMU counts RAM before compression: the wire tells
                figures["memory_sent_bytes"] = figures["wire_bytes"] - figures["mirror_bytes"]
            figures["total_s"] = figures["running_at"] - figures["started_at"]
            figures["source_status"] = _quit(src)
            try:
                pinger.aim(control(dst, timeout=10))
                figures.update(self._goes_on(consoles, pinger, dst))
            except (SystemExit, OSError) as failed:  # the guest broke at the destination: a result, not the end
                print(f"  THE GUEST FAILED AT THE DESTINATION: {failed}", flush=True)
                figures.update(self._downtime(consoles), restore_check=f"failed: {str(failed)[:2000]}")
                figures["destination_state"] = _state(dst)
                _kill_pidfile(dst / "qemu.pid")
                time.sleep(1)
            figures["disk_check"] = _qemu_img_check(figures.pop("disk"))
            return figures
        finally:
            if ticker is not None:
                ticker.stop()
            pinger.stop()
            consoles.close()
            for side in (src, dst):
                _kill_pidfile(side / "qemu.pid")
            for child in self.children:
                child.kill()
                child.wait()
            self.children.clear()

    def _goes_on(self, consoles: Consoles, pinger: Pinger, dst: Path) -> dict[str, Any]:
        """The guest on the destination: it finishes its workload, answers its control serial
        for a second, then checks its files and powers off. The guest-measured downtime."""
        consoles.wait("MARKER_B", 300)
        time.sleep(1.0)
        ctl = pinger.target
        pinger.aim(None)
        assert ctl is not None
        ctl.setblocking(True)
        ctl.sendall(b"\nGO B restore-check\n")
        consoles.wait("RESTORE_CHECK_OK", 120, "destination")
        consoles.wait("SHUTDOWN", 60, "destination")
        for _ in range(600):  # the guest powers off: QEMU exits
            if not (dst / "qemu.pid").exists():
                break
            time.sleep(0.05)
        return {**self._downtime(consoles), "restore_check": "ok"}

    @staticmethod
    def _downtime(consoles: Consoles) -> dict[str, Any]:
        """The guest-measured downtime, and what the consoles show of the guest's work."""
        before, after = consoles.clock_offset("source"), consoles.clock_offset("destination")
        echoes = [at for at, side, line in consoles.lines if side == "destination" and "ignoring control line" in line]
        return {
            "guest_downtime_s": after[0] - before[0] if before and after else None,
            "guest_clock_lines": [before[1] if before else 0, after[1] if after else 0],
            "console_silence_s": consoles.silence(),
            "workload_done_on": "source" if consoles.seen("MARKER_B", "source") else "destination",
            "answers_on_destination": len(echoes),
        }

    # -- vmdelta ------------------------------------------------------------------------------

    def vmdelta(self, link: HandoffLink, src: Path, dst: Path, started: float) -> dict[str, Any]:
        return self._vmdelta(link, src, dst, self.disk_flags, self.send_with)

    def vmdelta_shared(self, link: HandoffLink, src: Path, dst: Path, started: float) -> dict[str, Any]:
        """The memory alone, the disk shared, sent without progress: nothing asks QEMU's monitor
        anything while the stream is relayed."""
        return self._vmdelta(link, src, dst, [], "library")

    def _vmdelta(
        self, link: HandoffLink, src: Path, dst: Path, disk_flags: list[str], send_with: str
    ) -> dict[str, Any]:
        bases = ["--memory-base", str(self.fixtures / "base.mem"), "--disk-base", str(self.fixtures / "base.img")]
        common = [*bases, "--token-file", str(self.token), "--cache-dir", str(self.cache), "--timeout", "60"]
        shared = not disk_flags
        moved = dst / "disk.qcow2"  # written by the receiver, which wants it absent
        disk = src / "disk.qcow2" if shared else Path("{disk0}")
        receive_flags = [] if shared else ["--disk", str(moved)]
        receiver = subprocess.Popen(
            link.on_cloudlet(
                [*VMDELTA, "handoff", "receive", "--listen", f"{CLOUDLET_IP}:{HANDOFF_PORT}", *common,
                 *receive_flags, "--", *self.vm_argv(dst, disk, "fd:0")]
            ),
            env=self.env, stdout=subprocess.PIPE, stderr=(dst / "receive.log").open("w"), text=True,
        )  # fmt: skip
        try:
            while "waiting for a handoff" not in (dst / "receive.log").read_text():
                if receiver.poll() is not None:
                    raise SystemExit(f"vmdelta handoff receive did not start: {(dst / 'receive.log').read_text()}")
                time.sleep(0.05)
            started = time.monotonic()  # the clock restarts: the receiver is ready
            send = [*VMDELTA, "handoff", "send"] if send_with == "cli" else [sys.executable, __file__, "--send"]
            sent = subprocess.run(
                link.on_sender(
                    [*send, "--qmp", str(src / "qmp.sock"), "--to", f"{CLOUDLET_IP}:{HANDOFF_PORT}", *common,
                     *disk_flags, "--json", "--parameter", f"downtime-limit={DOWNTIME_LIMIT_MS}"]
                ),
                env=self.env, stdout=(dst / "send.json").open("w"), stderr=(dst / "send.log").open("w"), check=False,
            )  # fmt: skip
            if sent.returncode:
                receiver.wait(30)
                raise SystemExit(
                    f"vmdelta handoff send failed: {(dst / 'send.log').read_text().strip()}\n"
                    f"the receiver said: {(dst / 'receive.log').read_text().strip()}"
                )
            with contextlib.closing(monitor(dst / "qmp.sock")) as qmp:
                running = running_after(qmp, 120)
            if receiver.wait(60):
                raise SystemExit(f"vmdelta handoff receive failed: {(dst / 'receive.log').read_text().strip()}")
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        report = json.loads((dst / "send.json").read_text())
        relay = report["relay"]
        disk_sent = sum(p["sent"] for p in relay.get("disk_passes", []))
        return {
            "running_at": running,
            "qemu_downtime_ms": report["downtime_ms"],
            "disk": src / "disk.qcow2" if shared else moved,
            "disk_moved": not shared,
            "memory_stream_bytes": relay["stream_bytes"],
            "memory_sent_bytes": relay["sent_bytes"] - disk_sent,
            "disk_sent_bytes": disk_sent,
            "passes": relay["passes"],
            "pages": relay["pages"],
            "report": report,
            "started_at": started,
        }

    # -- QEMU ---------------------------------------------------------------------------------

    def qemu_multifd(self, link: HandoffLink, src: Path, dst: Path, started: float) -> dict[str, Any]:
        return self._precopy(link, src, dst, {"multifd": True}, {"multifd-compression": "zstd"})

    def qemu_multifd_plain(self, link: HandoffLink, src: Path, dst: Path, started: float) -> dict[str, Any]:
        return self._precopy(link, src, dst, {"multifd": True}, {})

    def qemu_plain(self, link: HandoffLink, src: Path, dst: Path, started: float) -> dict[str, Any]:
        return self._precopy(link, src, dst, {}, {})

    def qemu_xbzrle(self, link: HandoffLink, src: Path, dst: Path, started: float) -> dict[str, Any]:
        return self._precopy(link, src, dst, {"xbzrle": True}, {})

    def _precopy(
        self, link: HandoffLink, src: Path, dst: Path, capabilities: dict[str, bool], parameters: dict[str, Any]
    ) -> dict[str, Any]:
        """The destination's QEMU waits with an NBD export of its disk; the source mirrors its
        overlay there, migrates once the mirror is ready, and completes the mirror in the pause
        before switchover."""
        disk = self.overlay(dst / "disk.qcow2")
        self.children.append(
            subprocess.Popen(
                link.on_cloudlet(self.vm_argv(dst, disk, "defer")),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        caps = [{"capability": k, "state": v} for k, v in capabilities.items()]
        with contextlib.closing(monitor(dst / "qmp.sock")) as dq, contextlib.closing(monitor(src / "qmp.sock")) as sq:
            dq.cmd("migrate-set-capabilities", capabilities=caps)
            if parameters:
                dq.cmd("migrate-set-parameters", **parameters)
            nbd = {"type": "inet", "host": CLOUDLET_IP, "port": str(NBD_PORT)}
            dq.cmd("nbd-server-start", addr={"type": "inet", "data": {k: nbd[k] for k in ("host", "port")}})
            dq.cmd("block-export-add", type="nbd", id="disk0", name="disk0", **{"node-name": _node(dq)}, writable=True)
            dq.cmd("migrate-incoming", uri=f"tcp:{CLOUDLET_IP}:{MIGRATION_PORT}")
            started = time.monotonic()  # the clock restarts: the destination is ready
            sq.cmd("blockdev-add", driver="nbd", **{"node-name": "target"}, server=nbd, export="disk0")
            sq.cmd("blockdev-mirror", **{"job-id": "mirror"}, device="disk0", target="target", sync="top")
            while not (jobs := sq.cmd("query-block-jobs")) or not jobs[0].get("ready"):
                time.sleep(0.05)
            mirror_ready = time.monotonic()
            caps.append({"capability": "pause-before-switchover", "state": True})
            sq.cmd("migrate-set-capabilities", capabilities=caps)
            sq.cmd("migrate-set-parameters", **parameters, **{"downtime-limit": DOWNTIME_LIMIT_MS})
            sq.cmd("migrate", uri=f"tcp:{CLOUDLET_IP}:{MIGRATION_PORT}")
            mirrored, deadline = 0, time.monotonic() + MIGRATION_LIMIT_S
            while (info := sq.cmd("query-migrate"))["status"] != "completed":
                if time.monotonic() > deadline:
                    sq.cmd("migrate_cancel")
                    raise SystemExit(f"QEMU's migration did not converge in {MIGRATION_LIMIT_S} s")
                if info["status"] == "pre-switchover":
                    jobs = sq.cmd("query-block-jobs")
                    mirrored = jobs[0]["offset"] if jobs else mirrored
                    sq.cmd("block-job-cancel", device="mirror")
                    while sq.cmd("query-block-jobs"):
                        time.sleep(0.005)
                    sq.cmd("migrate-continue", state="pre-switchover")
                elif info["status"] in ("failed", "cancelled"):
                    raise SystemExit(f"QEMU's migration {info['status']}: {info.get('error-desc')}")
                time.sleep(0.005)
            running = running_after(dq, 120)
            dq.cmd("block-export-del", id="disk0", mode="hard")  # the source still holds its client
            dq.cmd("nbd-server-stop")
        ram = info.get("ram", {})
        return {
            "running_at": running,
            "started_at": started,
            "qemu_downtime_ms": info.get("downtime"),
            "disk": disk,
            "disk_moved": True,
            "mirror_ready_s": mirror_ready - started,
            "mirror_bytes": mirrored,
            "disk_sent_bytes": mirrored,
            "qemu_ram_transferred": ram.get("transferred"),
            "passes": ram.get("dirty-sync-count"),
            "query_migrate": info,
        }


def _quit(folder: Path) -> str:
    """Stop the QEMU in ``folder`` (the source, once the guest left it); its last run state."""
    qmp = monitor(folder / "qmp.sock")
    try:
        status = qmp.cmd("query-status")["status"]
        qmp.cmd("quit")
    finally:
        with contextlib.suppress(Exception):  # QEMU hangs up as it quits
            qmp.close()
    return status


def _state(folder: Path) -> dict[str, Any]:
    """What QEMU in ``folder`` says of its guest (run state, registers), for a guest that fails."""
    try:
        qmp = monitor(folder / "qmp.sock", timeout=5)
    except SystemExit:
        return {"qemu": "gone"}
    try:
        return {
            "status": qmp.cmd("query-status"),
            "registers": qmp.cmd("human-monitor-command", **{"command-line": "info registers"}),
        }
    except Exception as exc:
        return {"qemu": f"no answer: {exc}"}
    finally:
        with contextlib.suppress(Exception):
            qmp.close()


def _node(qmp: QEMUMonitorProtocol) -> str:
    """The node name of the guest's drive (``disk0``) as QEMU named it."""
    for device in qmp.cmd("query-block"):
        if device["device"] == "disk0":
            return device["inserted"]["node-name"]
    raise SystemExit("the destination has no drive disk0")


def _qemu_img_check(disk: Path) -> str:
    done = subprocess.run(["qemu-img", "check", "-q", str(disk)], capture_output=True, text=True, check=False)
    return "ok" if done.returncode == 0 else f"exit {done.returncode}: {(done.stdout + done.stderr).strip()}"


def send_without_progress(argv: list[str]) -> None:
    """``vmdelta handoff send``'s own work, through the library and without its progress (which
    asks QEMU's monitor how the migration goes twice a second): the same options, the same JSON
    report. Shows whether those questions change what a handoff costs."""
    from vmdelta_core.cli.handoff import _specs
    from vmdelta_core.handoff.source import SendConfig, hand_off
    from vmdelta_core.serve.settings import parse_address, read_token

    parser = argparse.ArgumentParser()
    for flag in ("--qmp", "--to", "--memory-base", "--disk-base", "--token-file", "--cache-dir"):
        parser.add_argument(flag)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--move-disk", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--parameter", action="append", default=[])
    args = parser.parse_args(argv)
    host, port = parse_address(args.to)
    config = SendConfig(
        qmp=Path(args.qmp),
        host=host,
        port=port,
        token=read_token(Path(args.token_file), None),
        bases=_specs(args),
        parameters={k: json.loads(v) for k, v in (p.split("=", 1) for p in args.parameter)},
        timeout=args.timeout,
        cache_dir=Path(args.cache_dir),
        **({"move_disk": True} if args.move_disk else {}),
    )
    print(json.dumps(hand_off(config).as_json(), sort_keys=True))


def disk_transfer_flags() -> list[str]:
    """The flag that makes `vmdelta handoff send` move the disk, when the command has it."""
    shown = subprocess.run([*VMDELTA, "handoff", "send", "--help"], capture_output=True, text=True, check=True).stdout
    return ["--move-disk"] if "--move-disk" in shown else []


class _Ticker:
    """A progress line every 10 s: time so far and bytes on the wire."""

    def __init__(self, name: str, link: HandoffLink, started: float, before: int) -> None:
        self._stop = threading.Event()

        def tick() -> None:
            while not self._stop.wait(10):
                mib = (link.wire_bytes() - before) / 2**20
                print(f"    {name}: {time.monotonic() - started:5.0f} s, {mib:6.1f} MiB on the wire", flush=True)

        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="25,10", help="link rates in Mbit/s (default 25,10)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each contender; the median is shown")
    parser.add_argument(
        "--contenders",
        default="vmdelta,multifd,xbzrle",
        help="which to run (default vmdelta,multifd,xbzrle; also vmdelta-shared: the memory alone, the disk shared; "
        "multifd-plain and plain: QEMU without compression)",
    )
    parser.add_argument(
        "--send-with",
        choices=("cli", "library"),
        default="cli",
        help="run vmdelta's sending side as `vmdelta handoff send` (default) or through the library, without "
        "the command's progress and its questions to QEMU's monitor",
    )
    parser.add_argument("--send", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (consoles, logs, disks)")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "handoff.json", help="the JSON results")
    args = parser.parse_args()
    if args.send is not None:
        send_without_progress(args.send)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks clean up
    if os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("needs root, ip and tc (iproute2), and qemu-system-x86_64")
    from vmdelta_core.testing import real_fixtures

    fixtures = real_fixtures()
    if fixtures is None or not stream_capture(fixtures):
        raise SystemExit("needs the realistic fixtures, a QEMU 7.2 capture (VMDELTA_FIXTURES)")
    clean_leftovers()
    work = Path(tempfile.gettempdir()) / f"{WORK_PREFIX}{os.getpid() % 100000}"
    work.mkdir()
    import vmdelta_core

    results: dict[str, Any] = {
        "started": _now(),
        "uptime_before": _uptime(),
        "vmdelta_code": str(Path(vmdelta_core.__file__).parent.parent),
        "runs": [],
        "failures": [],
    }
    try:
        bench = Bench(fixtures, work)
        bench.send_with = results["vmdelta_send_with"] = args.send_with
        print("indexing the bases once (both hosts keep their index)", flush=True)
        bench.index_bases()
        every = {
            "vmdelta": ("vmdelta handoff", bench.vmdelta),
            "vmdelta-shared": ("vmdelta handoff, shared disk", bench.vmdelta_shared),
            "multifd": ("QEMU multifd+zstd", bench.qemu_multifd),
            "xbzrle": ("QEMU xbzrle", bench.qemu_xbzrle),
            "multifd-plain": ("QEMU multifd", bench.qemu_multifd_plain),
            "plain": ("QEMU precopy", bench.qemu_plain),
        }
        contenders = [every[name] for name in args.contenders.split(",")]
        results["vmdelta_disk"] = "moved" if bench.disk_flags else "shared storage"
        for mbit in (float(r) for r in args.rates.split(",")):
            with HandoffLink(mbit) as link:
                for run in range(args.runs):
                    for name, move in contenders:  # interleaved, so that drifts hit every contender
                        print(f"{mbit:g} Mbit/s, run {run + 1}: {name}", flush=True)
                        try:
                            figures = bench.run(name, link, move)
                        except SystemExit as failed:  # one contender's failure is a result too
                            print(f"  FAILED: {failed}", flush=True)
                            results["failures"].append({"mbit": mbit, "contender": name, "error": str(failed)})
                            continue
                        figures = {k: (str(v) if isinstance(v, Path) else v) for k, v in figures.items()}
                        results["runs"].append({"mbit": mbit, "contender": name, "run": run + 1, **figures})
                        print("  " + _summary(figures), flush=True)
        results["uptime_after"] = _uptime()
        results["finished"] = _now()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
        print("\n" + table(results))
        print(f"\nresults in {args.output}")
    finally:
        if args.keep:
            print(f"the work folder is kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _summary(f: dict[str, Any]) -> str:
    guest = f.get("guest_downtime_s")
    return (
        f"running at the destination after {f['total_s']:.2f} s; downtime QEMU {f['qemu_downtime_ms']} ms, "
        f"guest {guest * 1000:.0f} ms; {f['wire_bytes'] / 2**20:.1f} MiB on the wire; "
        f"workload done on the {f['workload_done_on']}, {f['answers_on_destination']} answers there, "
        f"restore-check {f['restore_check']}, qemu-img check {f['disk_check']}"
        if guest is not None
        else f"total {f['total_s']:.2f} s; no guest clock on both sides"
    )


def table(results: dict[str, Any]) -> str:
    """The Markdown table of the medians, with vmdelta's ratio to QEMU's best at each rate."""
    lines = [
        "| link | contender | total | / QEMU best | downtime (QEMU) | downtime (guest) | on the wire "
        "| memory sent | disk sent | guest goes on |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rates = sorted({r["mbit"] for r in results["runs"]}, reverse=True)
    for mbit in rates:
        runs = [r for r in results["runs"] if r["mbit"] == mbit]
        names = list(dict.fromkeys(r["contender"] for r in runs))

        def median(name: str, key: str, runs: list[dict[str, Any]] = runs) -> float:
            found = [r[key] for r in runs if r["contender"] == name and r.get(key) is not None]
            return statistics.median(found) if found else float("nan")

        qemu = [n for n in names if n.startswith("QEMU")]
        best = min((median(n, "total_s") for n in qemu), default=None)
        for name in names:
            total = median(name, "total_s")
            ratio = f"{total / best:.2f}x" if best else "-"
            mine = [r for r in runs if r["contender"] == name]
            goes_on = "yes" if all(r["restore_check"] == "ok" and r["disk_check"] == "ok" for r in mine) else "NO"
            lines.append(
                f"| {mbit:g} Mbit/s | {name} | {total:.1f} s | {ratio} | {median(name, 'qemu_downtime_ms'):.0f} ms | "
                f"{median(name, 'guest_downtime_s') * 1000:.0f} ms | {median(name, 'wire_bytes') / 2**20:.1f} MiB | "
                f"{median(name, 'memory_sent_bytes') / 2**20:.1f} MiB | {_disk_sent(mine)} | {goes_on} |"
            )
    for failed in results.get("failures", []):
        lines.append(f"\n{failed['mbit']:g} Mbit/s, {failed['contender']} failed: {failed['error'][:300]}")
    return "\n".join(lines)


def _disk_sent(runs: list[dict[str, Any]]) -> str:
    if not all(r["disk_moved"] for r in runs):
        return "shared"
    return f"{statistics.median(r.get('disk_sent_bytes') or 0 for r in runs) / 2**20:.2f} MiB"


if __name__ == "__main__":
    main()
