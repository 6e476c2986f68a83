#!/usr/bin/env python3
"""Time to a running guest: the realistic VM provisioned over a shaped link into a real QEMU.

Two network namespaces joined by a veth pair, the sender's side shaped by tc's token bucket
filter; on the cloudlet's side a real ``qemu-system-x86_64`` resumes the realistic guest. The
clock starts when the sending process starts and stops when the resumed guest answers its first
command (it begins checking its cached files against its disk), and again once that check passed.

* ``transfer alone``: the overlay's bytes cross the link, nothing else (the floor);
* ``file, apply, load``: the overlay file crosses, ``vmdelta apply`` rebuilds memory and disk,
  QEMU loads them;
* ``zstd, patch, load``: the same with ``zstd -3 --long=31 --patch-from`` patches;
* ``send to serve``: ``vmdelta send`` streams the overlay to ``vmdelta serve``, which rebuilds
  the disk and streams the memory into QEMU (``-incoming fd:0``) as the overlay arrives.

Needs root (``ip netns``, ``tc``), ``qemu-system-x86_64``, ``zstd`` and the realistic fixtures
(a QEMU 7.2 capture)::

    sudo python bench/resume.py                  # 25 and 100 Mbit/s, one run each
    sudo python bench/resume.py --rates 25 --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the guest driver the integration tests use; not bench/ itself, whose qemu.py would hide qemu.qmp
sys.path[0] = str(ROOT / "tests" / "integration")

from fixture_guest import RunningGuest, qemu_argv, stream_capture  # noqa: E402

VMDELTA = [sys.executable, "-m", "vmdelta_core"]
PORT, SERVE_PORT = 7479, 7478
SENDER_IP, CLOUDLET_IP = "10.213.0.1", "10.213.0.2"
_LENGTH = struct.Struct(">Q")


# ------------------------------------------------------------------------------------------------
# the link
# ------------------------------------------------------------------------------------------------


class Link:
    """A sender and a cloudlet namespace joined by a veth pair, the sender's egress at ``mbit``."""

    def __init__(self, mbit: float) -> None:
        tag = f"{os.getpid() % 100000}"
        self.sender, self.cloudlet = f"vmd-snd-{tag}", f"vmd-cld-{tag}"
        self._ends = (f"vmdS{tag}", f"vmdC{tag}")
        self.mbit = mbit

    def __enter__(self) -> Link:
        s, c = self._ends
        _ip("netns", "add", self.sender)
        _ip("netns", "add", self.cloudlet)
        try:
            _ip("link", "add", s, "type", "veth", "peer", "name", c)
            _ip("link", "set", s, "netns", self.sender)
            _ip("link", "set", c, "netns", self.cloudlet)
            for ns, end, address in ((self.sender, s, SENDER_IP), (self.cloudlet, c, CLOUDLET_IP)):
                _ip("-n", ns, "addr", "add", f"{address}/30", "dev", end)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", end, "up")
            # a burst above the largest segment the veth hands over (64 KiB with offloads)
            subprocess.run(
                ["tc", "-n", self.sender, "qdisc", "add", "dev", s, "root", "tbf",
                 "rate", f"{self.mbit:g}mbit", "burst", "128kb", "latency", "100ms"],
                check=True,
            )  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.sender, self.cloudlet):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)

    def on_sender(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.sender, *argv]

    def on_cloudlet(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.cloudlet, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def receive(port: int, outputs: list[str]) -> None:
    """Accept one connection and write each length-prefixed file it carries to an output."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as stream:
            for out in outputs:
                (length,) = _LENGTH.unpack(stream.read(_LENGTH.size))
                with open(out, "wb") as sink:
                    while length:
                        chunk = stream.read(min(length, 1 << 20))
                        if not chunk:
                            raise SystemExit("the sender went away")
                        sink.write(chunk)
                        length -= len(chunk)


def send(address: str, files: list[str]) -> None:
    """Send each file, length-prefixed, over one connection."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        for name in files:
            conn.sendall(_LENGTH.pack(os.path.getsize(name)))
            with open(name, "rb") as src:
                conn.sendfile(src)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)


# ------------------------------------------------------------------------------------------------
# the contenders
# ------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, fixtures: Path, work: Path) -> None:
        self.fixtures, self.work = fixtures, work
        # bytecode cached, as an installed tool has it
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env = {**env, "VMDELTA_CACHE_DIR": str(work / "cache")}
        self.runs = 0

    def prepare(self) -> None:
        f, w = self.fixtures, self.work
        pairs = ["--memory", str(f / "base.mem"), str(f / "modified.mem"),
                 "--disk", str(f / "base.img"), str(f / "modified.img")]  # fmt: skip
        with open(w / "vm.vmds", "wb") as out:
            subprocess.run([*VMDELTA, "create", "-q", "-o", "-", *pairs], stdout=out, env=self.env, check=True)
        subprocess.run([*VMDELTA, "convert", "-q", str(w / "vm.vmds"), str(w / "vm.vmdo")], env=self.env, check=True)
        for kind, ext in (("mem", "mem"), ("img", "img")):
            subprocess.run(
                ["zstd", "-3", "--long=31", "-q", "-f", f"--patch-from={f / f'base.{ext}'}",
                 str(f / f"modified.{ext}"), "-o", str(w / f"{kind}.zst")],
                check=True,
            )  # fmt: skip
        (w / "token").write_text("a token for the benchmark\n")
        # the cloudlet holds its bases ready, as it would: indexed, the memory's RAM kept laid out
        subprocess.run(
            [*VMDELTA, "index", "-q", "--kind", "memory", "--image", str(f / "base.mem")], env=self.env, check=True
        )
        subprocess.run([*VMDELTA, "index", "-q", str(f / "base.img")], env=self.env, check=True)

    def folder(self) -> Path:
        self.runs += 1
        folder = self.work / f"run{self.runs}"
        folder.mkdir()
        return folder

    def _carry(self, link: Link, files: list[Path], outputs: list[Path]) -> float:
        """Start a receiver on the cloudlet, then send: the clock starts with the sender."""
        receiver = subprocess.Popen(
            link.on_cloudlet([sys.executable, __file__, "--receive", str(PORT), *map(str, outputs)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert receiver.stdout is not None
        receiver.stdout.readline()  # "ready"
        started = time.monotonic()
        subprocess.run(
            link.on_sender([sys.executable, __file__, "--send", f"{CLOUDLET_IP}:{PORT}", *map(str, files)]), check=True
        )
        if receiver.wait(600):
            raise SystemExit("the receiver failed")
        return started

    def transfer(self, link: Link) -> dict[str, float]:
        folder = self.folder()
        started = self._carry(link, [self.work / "vm.vmds"], [folder / "arrived"])
        return {"running": time.monotonic() - started}

    def file_apply_load(self, link: Link) -> dict[str, float]:
        folder = self.folder()
        started = self._carry(link, [self.work / "vm.vmdo"], [folder / "vm.vmdo"])
        f = self.fixtures
        subprocess.run(
            [*VMDELTA, "apply", "-q", str(folder / "vm.vmdo"), "--memory", str(f / "base.mem"), str(folder / "vm.mem"),
             "--disk", str(f / "base.img"), str(folder / "vm.img")],
            env=self.env, check=True,
        )  # fmt: skip
        return self._load(folder, started)

    def zstd_patch_load(self, link: Link) -> dict[str, float]:
        folder = self.folder()
        patches = [self.work / "mem.zst", self.work / "img.zst"]
        started = self._carry(link, patches, [folder / p.name for p in patches])
        for ext in ("mem", "img"):
            subprocess.run(
                ["zstd", "-d", "--long=31", "-q", "-f", f"--patch-from={self.fixtures / f'base.{ext}'}",
                 str(folder / f"{ext}.zst"), "-o", str(folder / f"vm.{ext}")],
                check=True,
            )  # fmt: skip
        return self._load(folder, started)

    def _load(self, folder: Path, started: float) -> dict[str, float]:
        argv = qemu_argv(self.fixtures, folder, disk=str(folder / "vm.img"), incoming=f"exec:cat {folder / 'vm.mem'}")
        with _qemu(argv):
            return RunningGuest(folder).resume(clock=started)

    def send_to_serve(self, link: Link) -> dict[str, float]:
        name = self.folder().name
        (self.work / "vms" / name).mkdir()  # QEMU's sockets and console log
        started = time.monotonic()
        subprocess.run(
            link.on_sender(
                [*VMDELTA, "send", "-q", str(self.work / "vm.vmds"), f"{CLOUDLET_IP}:{SERVE_PORT}", "--name", name,
                 "--token-file", str(self.work / "token")]
            ),
            env=self.env, check=True,
        )  # fmt: skip
        try:
            return RunningGuest(self.work / "vms" / name).resume(clock=started)
        finally:
            _stop_vm(self.work / "vms" / name)

    @contextlib.contextmanager
    def serving(self, link: Link) -> Iterator[None]:
        """``vmdelta serve`` on the cloudlet, holding the bases (indexed once), starting QEMU."""
        f, w = self.fixtures, self.work
        (w / "vms").mkdir(exist_ok=True)
        command = qemu_argv(f, f"{w / 'vms'}/{{name}}", disk="{disk0}", incoming="fd:0")
        config = w / "serve.toml"
        quoted = ", ".join(f'"{arg}"' for arg in command)
        config.write_text(
            f'listen = "{CLOUDLET_IP}:{SERVE_PORT}"\noutput = "{w / "served"}"\ntoken_file = "{w / "token"}"\n'
            f'[[bases]]\nkind = "memory"\npath = "{f / "base.mem"}"\n'
            f'[[bases]]\nkind = "disk"\npath = "{f / "base.img"}"\n'
            f'[qemu]\ncommand = [{quoted}, "-pidfile", "{w / "vms"}/{{name}}/qemu.pid"]\n'
        )
        server = subprocess.Popen(
            link.on_cloudlet([*VMDELTA, "serve", "--config", str(config)]),
            env=self.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert server.stderr is not None
        for line in server.stderr:
            if "listening on" in line:
                break
        else:
            raise SystemExit("vmdelta serve did not start")
        try:
            yield
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


@contextlib.contextmanager
def _qemu(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield vm
    finally:
        try:
            vm.wait(60)  # the guest powers off after its check
        except subprocess.TimeoutExpired:
            vm.kill()
            vm.wait()


def _stop_vm(folder: Path) -> None:
    """The VM serve started powers off after its check; make sure of it."""
    pidfile = folder / "qemu.pid"
    for _ in range(600):
        if not pidfile.exists():
            return
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text())
            os.kill(pid, 0)
            time.sleep(0.1)
            continue
        return
    with contextlib.suppress(ValueError, OSError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="25,100", help="link rates in Mbit/s (default 25,100)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each contender; the median is shown")
    parser.add_argument("--receive", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--send", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        receive(int(args.receive[0]), args.receive[1:])
        return
    if args.send:
        send(args.send[0], args.send[1:])
        return
    if os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("needs root, ip and tc (iproute2), and qemu-system-x86_64")
    from vmdelta_core.testing import real_fixtures

    fixtures = real_fixtures()
    if fixtures is None or not stream_capture(fixtures):
        raise SystemExit("needs the realistic fixtures, a QEMU 7.2 capture (VMDELTA_FIXTURES)")
    work = Path(tempfile.mkdtemp(prefix="vmdelta-resume-"))
    try:
        bench = Bench(fixtures, work)
        bench.prepare()
        size = (work / "vm.vmds").stat().st_size
        contenders: list[tuple[str, Callable[[Link], dict[str, float]]]] = [
            ("transfer alone", bench.transfer),
            ("file, apply, load", bench.file_apply_load),
            ("zstd -3, patch, load", bench.zstd_patch_load),
            ("send to serve", bench.send_to_serve),
        ]
        print(f"overlay: {size} bytes (stream form); zstd patches: "
              f"{sum((work / p).stat().st_size for p in ('mem.zst', 'img.zst'))} bytes\n")  # fmt: skip
        lines = [
            "| link | contender | guest running | / transfer | check passed | loaded |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for mbit in (float(r) for r in args.rates.split(",")):
            with Link(mbit) as link, bench.serving(link):
                seen: dict[str, list[dict[str, float]]] = {name: [] for name, _ in contenders}
                for _ in range(args.runs):
                    for name, run in contenders:  # interleaved, so that drifts hit every contender
                        seen[name].append(run(link))
                floor = statistics.median(r["running"] for r in seen["transfer alone"])
                for name, _ in contenders:
                    running = statistics.median(r["running"] for r in seen[name])
                    checked = statistics.median(r.get("checked", r["running"]) for r in seen[name])
                    loaded = statistics.median(r.get("loaded", r["running"]) for r in seen[name])
                    lines.append(
                        f"| {mbit:g} Mbit/s | {name} | {running:.2f} s | {running / floor:.2f}x | "
                        f"{checked:.2f} s | {loaded:.2f} s |"
                    )
                print("\n".join(lines[-len(contenders) :]), flush=True)
        print("\n" + "\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
