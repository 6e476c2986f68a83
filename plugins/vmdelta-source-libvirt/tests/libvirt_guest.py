"""A small TCG guest under libvirt (qemu:///system), driven through its serial console.

The guest is the fixture set's kernel and initramfs (``boot/``) with busybox's shell as its
first process (``rdinit=/bin/busybox -- sh``) on ttyS0, which libvirt connects to a unix
socket. Commands go in as lines; results come back between ``@@`` markers, which the echo of
the typed line cannot produce. The daemons are started here when none is running (as root),
and only those are stopped again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

URI = "qemu:///system"

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{folder}/vmlinuz</kernel>
    <initrd>{folder}/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet rdinit=/bin/busybox -- sh</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{qemu}</emulator>
    <serial type='unix'>
      <source mode='bind' path='{folder}/console.sock'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtUnavailable(Exception):
    """libvirt cannot run here; the message says why."""


def virsh(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _answers() -> bool:
    try:
        virsh("version", timeout=30)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


@contextlib.contextmanager
def libvirt_daemons() -> Iterator[None]:
    """A libvirt daemon that answers on qemu:///system: the running one, or virtlogd and
    libvirtd started here (in the foreground, so they are this process's children) and stopped
    on exit."""
    if shutil.which("virsh") is None or shutil.which("libvirtd") is None:
        raise LibvirtUnavailable("libvirt is not installed (Debian: libvirt-daemon-system libvirt-clients)")
    if _answers():
        yield
        return
    if os.geteuid() != 0:
        raise LibvirtUnavailable("no libvirt daemon answers on qemu:///system, and only root may start one")
    started: list[subprocess.Popen[bytes]] = []
    try:
        for daemon in ("virtlogd", "libvirtd"):
            started.append(subprocess.Popen([daemon], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while not _answers():
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise LibvirtUnavailable("libvirtd was started but does not answer on qemu:///system")
            time.sleep(0.5)
        yield
    finally:
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Guest:
    """One transient domain; ``folder`` (world-writable, so QEMU's user can make the console
    socket) holds its kernel, initramfs, console socket and save images."""

    def __init__(self, boot: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vmdelta-libvirt-"))
        os.chmod(self.folder, 0o777)
        for name in ("vmlinuz", "initramfs.cpio.gz"):
            shutil.copy(boot / name, self.folder / name)
            os.chmod(self.folder / name, 0o644)
        self.name = f"vmdelta-test-{os.getpid()}"
        self.console: socket.socket | None = None
        self.pending = b""

    def start(self) -> None:
        xml = self.folder / "domain.xml"
        qemu = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        xml.write_text(DOMAIN.format(name=self.name, folder=self.folder, qemu=qemu))
        virsh("create", str(xml))
        self._connect()
        # the shell is up once it computes; busybox's applets then go on the PATH
        self.run("echo @@$((40+2))@@", r"@@42@@", timeout=600, retry=5)
        self.run(
            "/bin/busybox --install -s /bin; export PATH=/bin; mount -t devtmpfs dev /dev; echo @@$((1+1))@@", r"@@2@@"
        )

    def _connect(self) -> None:
        self.close_console()
        path = str(self.folder / "console.sock")
        deadline = time.monotonic() + 60
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        sock.settimeout(1)
        self.console, self.pending = sock, b""

    def run(self, line: str, answer: str, *, timeout: float = 300, retry: float | None = None) -> re.Match[bytes]:
        """Type ``line``; wait for output matching ``answer`` (typing again every ``retry``
        seconds, for a shell that is not up yet)."""
        assert self.console is not None
        pattern = re.compile(answer.encode())
        deadline = time.monotonic() + timeout
        typed = 0.0
        while time.monotonic() < deadline:
            if typed == 0.0 or (retry is not None and time.monotonic() - typed > retry):
                self.console.sendall(line.encode() + b"\n")
                typed = time.monotonic()
            with contextlib.suppress(TimeoutError):
                self.pending += self.console.recv(65536)
            found = pattern.search(self.pending)
            if found:
                self.pending = self.pending[found.end() :]
                return found
        raise TimeoutError(f"the guest did not answer {line!r} with {answer!r}; last output {self.pending[-300:]!r}")

    def work(self, megabytes: int) -> str:
        """Fill a file in the guest's RAM with random bytes; its MD5, as the guest computes it."""
        return self.checksum(f"dd if=/dev/urandom of=/work.bin bs=1M count={megabytes}; ")

    def checksum(self, before: str = "") -> str:
        found = self.run(before + 'echo "@@MD5 $(md5sum < /work.bin)@@"', r"@@MD5 ([0-9a-f]{32})")
        return found.group(1).decode()

    def save(self, path: Path) -> None:
        self.close_console()
        virsh("save", self.name, str(path))

    def restore(self, path: Path) -> None:
        virsh("restore", str(path))
        self._connect()

    def destroy(self) -> None:
        self.close_console()
        with contextlib.suppress(RuntimeError):
            virsh("destroy", self.name)

    def close_console(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None

    def remove(self) -> None:
        self.destroy()
        shutil.rmtree(self.folder, ignore_errors=True)
