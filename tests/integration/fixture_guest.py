"""The realistic fixture guest resumed in a real QEMU: its command line, and proof that it runs.

The captures in ``shared/fixtures`` record the command line that loaded each state back
(``manifest.json``, ``loadback.<tag>.cmdline``). :func:`qemu_argv` makes it point at a rebuilt
disk, a migration stream given as ``-incoming`` and sockets of our own. :class:`RunningGuest`
then does what proves a real resume: it waits for the load to finish (the capture was saved
paused), continues the VM, and sends the guest its next command on the control serial; the guest
checks files it had cached against their SHA-1 sums (the disk and the page cache must both be
right) and prints ``RESTORE_CHECK_OK`` on its console, then powers off.

Used by ``tests/integration/test_serve_real_qemu.py`` and ``bench/resume.py``.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from pathlib import Path

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = ["GuestFailed", "RunningGuest", "qemu_argv", "stream_capture"]

#: what the realistic guest prints on its console after "GO B restore-check"
BEGIN, CHECKED, SHUTDOWN = "RESTORE_CHECK_BEGIN", "RESTORE_CHECK_OK", "SHUTDOWN"
_MARKER = re.compile(r"@@FIXTURE ([^@]*)@@")


class GuestFailed(Exception):
    """The guest did not resume, or said it failed."""


def stream_capture(set_dir: Path) -> bool:
    """Whether ``set_dir`` is a QEMU 7.2 stream capture of the realistic workload (what the
    installed ``qemu-system-x86_64`` loads without extra options)."""
    manifest = json.loads((set_dir / "manifest.json").read_text())
    return (
        manifest.get("mode") == "stream"
        and manifest.get("workload") == "realistic"
        and manifest["qemu_version"]["qemu"]["major"] == 7
    )


def qemu_argv(set_dir: Path, folder: Path | str, *, disk: str, incoming: str, qemu: str | None = None) -> list[str]:
    """The modified state's load-back command line, its drive ``disk``, its migration stream
    ``incoming`` (``fd:0``, ``exec:cat FILE``), its console log, control serial and QMP socket in
    ``folder`` (a string may hold a placeholder such as ``{name}``)."""
    cmd = json.loads((set_dir / "manifest.json").read_text())["loadback"]["modified"]["cmdline"]
    out = [qemu or cmd[0]]
    args = iter(cmd[1:])
    for opt in args:
        if opt in ("-nographic", "-no-reboot"):
            out.append(opt)
            continue
        value = next(args)
        if opt in ("-kernel", "-initrd"):
            value = str(set_dir / "boot" / Path(value).name)
        elif opt == "-drive":
            value = re.sub(r"(^|,)file=[^,]*", rf"\1file={disk}", value)
        elif opt == "-serial":
            value = (
                f"file:{folder}/console.log"
                if value.startswith("file:")
                else f"unix:{folder}/ctl.sock,server=on,wait=off"
            )
        elif opt == "-qmp":
            value = f"unix:{folder}/qmp.sock,server=on,wait=off"
        elif opt == "-incoming":
            value = incoming
        out += [opt, value]
    return out


class RunningGuest:
    """The guest of a QEMU started with :func:`qemu_argv` in ``folder``: :meth:`resume` waits for
    its load, continues it and has it check its files, and returns when each step was seen."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def resume(self, timeout: float = 120.0, *, clock: float | None = None) -> dict[str, float]:
        """Seconds since ``clock`` (default: now) at which the load finished (``loaded``), the
        guest answered (``running``: it began its check) and its check passed (``checked``).
        A VM loaded paused (a saved state) is continued; one that resumed by itself (a live
        migration's destination) is left running."""
        start = time.monotonic() if clock is None else clock
        deadline = time.monotonic() + timeout
        seen: dict[str, float] = {}
        qmp = self._monitor(deadline)
        try:
            while (status := qmp.cmd("query-status")["status"]) == "inmigrate":
                self._before(deadline, "the incoming migration did not finish")
                time.sleep(0.01)
            seen["loaded"] = time.monotonic() - start
            if status == "paused":
                qmp.cmd("cont")
            elif status != "running":
                raise GuestFailed(f"QEMU's run state after the load is {status!r}")
            with self._control(deadline) as ctl:
                ctl.sendall(b"GO B restore-check\n")
                for marker in (BEGIN, CHECKED, SHUTDOWN):
                    self._wait_marker(marker, deadline)
                    seen[marker] = time.monotonic() - start
        finally:
            with contextlib.suppress(Exception):
                qmp.close()
        return {"loaded": seen["loaded"], "running": seen[BEGIN], "checked": seen[CHECKED]}

    def _monitor(self, deadline: float) -> QEMUMonitorProtocol:
        path = self.folder / "qmp.sock"
        while True:
            qmp = QEMUMonitorProtocol(str(path))
            try:
                qmp.connect()
                return qmp
            except (OSError, ConnectError):  # not listening yet: QEMU starts when its disks are in place
                with contextlib.suppress(Exception):
                    qmp.close()
                self._before(deadline, f"no QMP socket at {path}")
                time.sleep(0.01)

    @contextlib.contextmanager
    def _control(self, deadline: float):  # type: ignore[no-untyped-def]
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.folder / "ctl.sock"))
                break
            except OSError:
                sock.close()
                self._before(deadline, "the guest's control serial does not answer")
                time.sleep(0.01)
        with sock:
            yield sock

    def _wait_marker(self, marker: str, deadline: float) -> None:
        log = self.folder / "console.log"
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            for found in _MARKER.finditer(text):
                words = found.group(1).split()
                if words and words[0] == "FAIL":
                    raise GuestFailed(f"the guest failed: {found.group(1).strip()}")
                if words and words[0] == marker:
                    return
            self._before(deadline, f"the guest did not print {marker}")
            time.sleep(0.01)

    def _before(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise GuestFailed(what)
