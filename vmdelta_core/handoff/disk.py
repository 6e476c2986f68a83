"""The guest's disk in a handoff: read through the source's QEMU, written into a thin qcow2.

At the source the guest runs from a qcow2 overlay over the base disk. :class:`DriveExport`
starts a dirty bitmap on the drive first, then exports it over NBD (``nbd-server-start`` on a
unix socket of its own): the clusters the overlay holds (``qemu:allocation-depth`` 1) are read
while the guest runs, then, pass after pass, the blocks it wrote meanwhile; once QEMU has
stopped the guest for the end of the migration, the blocks written since the last pass. The
qcow2 file that QEMU writes is never read directly.

At the destination :class:`ThinDisk` creates a qcow2 over its base disk, writes the blocks through
``qemu-nbd``, and on :meth:`ThinDisk.finish` flushes them, lets ``qemu-nbd`` go and runs
``qemu-img check``: only then may QEMU resume from it. Should anything fail, the file is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmdelta_core.errors import ConfigError, StorageError
from vmdelta_core.handoff.nbd import NbdClient

__all__ = ["DriveExport", "ThinDisk", "find_drive"]

BLOCK = 4096
#: bytes read from QEMU at once
_READ = 1 << 20
_BITMAP = "vmdelta-handoff"
_ALLOCATION = "qemu:allocation-depth"


def find_drive(qmp: Any, drive: str | None, base: Path) -> dict[str, Any]:
    """The VM's drive that moves: ``drive`` by name (a ``-drive id`` or node name), or its only
    qcow2 drive; it must be a writable qcow2 overlay whose backing file is ``base``.

    :raises ConfigError: no such drive, or it is not an overlay of the base disk.
    """
    devices = [d for d in qmp.cmd("query-block") if d.get("inserted")]
    if drive is not None:
        chosen = [d for d in devices if drive in (d.get("device"), d["inserted"].get("node-name"))]
        if not chosen:
            raise ConfigError(f"the VM has no drive {drive!r}")
    else:
        chosen = [d for d in devices if d["inserted"].get("drv") == "qcow2" and not d["inserted"].get("ro")]
        if len(chosen) != 1:
            names = ", ".join(d.get("device") or d["inserted"]["node-name"] for d in chosen) or "none"
            raise ConfigError(f"say which drive moves (--drive): the VM's writable qcow2 drives are {names}")
    inserted = chosen[0]["inserted"]
    name = chosen[0].get("device") or inserted["node-name"]
    if inserted.get("drv") != "qcow2" or inserted.get("ro"):
        raise ConfigError(f"drive {name} is not a writable qcow2 image; a handoff moves a qcow2 overlay")
    backing = inserted.get("image", {}).get("backing-image", {}).get("filename")
    if not backing or not _same_file(backing, base):
        raise ConfigError(f"drive {name} is backed by {backing or 'nothing'}, not by the base disk {base}")
    size = int(inserted["image"]["virtual-size"])
    if size % BLOCK:
        raise ConfigError(f"drive {name} holds {size} bytes, not whole {BLOCK}-byte blocks")
    return {"node": inserted["node-name"], "name": name, "size": size}


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class DriveExport:
    """The drive read through its QEMU: a dirty bitmap is started on entry, and everything QEMU
    was given (bitmaps, exports, NBD server) is taken back on :meth:`close`.

    QEMU exports only a bitmap that no longer records, so each pass over what the guest wrote
    swaps bitmaps atomically (a new one starts as the old one stops, in one ``transaction``)
    and reads the blocks the old one marks; no write falls between the two."""

    def __init__(self, qmp: Any, node: str, timeout: float = 60.0) -> None:
        self.qmp = qmp
        self.node = node
        self.timeout = timeout
        self._folder = Path(tempfile.mkdtemp(prefix="vmdelta-handoff-"))
        self.socket = self._folder / "nbd.sock"
        self._exports: list[str] = []
        self._bitmaps: list[str] = []
        self._made = 0
        self._server = False
        try:
            qmp.cmd("block-dirty-bitmap-add", node=node, name=self._new_bitmap())
            qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.socket)}})
            self._server = True
        except BaseException:
            self.close()
            raise

    def allocated(self) -> Iterator[tuple[int, bytes]]:
        """The blocks the overlay holds, read now (the guest may be running)."""
        with self._export(allocation=True) as client:
            extents = [(o, n) for o, n, depth in client.extents(_ALLOCATION) if depth == 1]
            yield from _read(client, extents)

    def written(self) -> Iterator[tuple[int, bytes]]:
        """The blocks written since the last pass, read while the guest runs on (a new bitmap
        records what it writes meanwhile)."""
        old, new = self._bitmaps[-1], self._new_bitmap()
        self.qmp.cmd(
            "transaction",
            actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": self.node, "name": new}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": self.node, "name": old}},
            ],
        )
        yield from self._marked(old)
        self._remove_bitmap(old)

    def dirtied(self) -> Iterator[tuple[int, bytes]]:
        """The blocks written since the last pass; call once the guest is stopped."""
        last = self._bitmaps[-1]
        self.qmp.cmd("block-dirty-bitmap-disable", node=self.node, name=last)
        yield from self._marked(last)

    def _marked(self, bitmap: str) -> Iterator[tuple[int, bytes]]:
        context = f"qemu:dirty-bitmap:{bitmap}"
        with self._export(bitmap=bitmap) as client:
            extents = [(o, n) for o, n, dirty in client.extents(context) if dirty & 1]
            yield from _read(client, extents)

    def _new_bitmap(self) -> str:
        self._made += 1
        name = f"{_BITMAP}-{self._made}"
        self._bitmaps.append(name)  # before it exists: close() tries it either way
        return name

    def _remove_bitmap(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.qmp.cmd("block-dirty-bitmap-remove", node=self.node, name=name)
        self._bitmaps.remove(name)

    @contextlib.contextmanager
    def _export(self, *, allocation: bool = False, bitmap: str | None = None) -> Iterator[NbdClient]:
        self._made += 1
        name = f"vmdelta-{self._made}"
        options: dict[str, Any] = {"node-name": self.node, "name": name, "writable": False}
        contexts = []
        if allocation:
            options["allocation-depth"] = True
            contexts.append(_ALLOCATION)
        if bitmap is not None:
            options["bitmaps"] = [bitmap]
            contexts.append(f"qemu:dirty-bitmap:{bitmap}")
        self.qmp.cmd("block-export-add", type="nbd", id=name, **options)
        self._exports.append(name)
        with NbdClient(self.socket, name, tuple(contexts), self.timeout) as client:
            yield client
        self._drop(name)

    def _drop(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.qmp.cmd("block-export-del", id=name)
        self._exports.remove(name)

    def close(self) -> None:
        """Exports, server and bitmaps removed (best effort: QEMU may have gone on)."""
        for name in list(self._exports):
            self._drop(name)
        if self._server:
            with contextlib.suppress(Exception):
                self.qmp.cmd("nbd-server-stop")
            self._server = False
        for name in list(self._bitmaps):
            self._remove_bitmap(name)
        shutil.rmtree(self._folder, ignore_errors=True)


def _read(client: NbdClient, extents: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    for offset, length in extents:
        start, end = offset - offset % BLOCK, -(-(offset + length) // BLOCK) * BLOCK
        for at in range(start, min(end, client.size), _READ):
            yield at, client.read(at, min(_READ, end - at))


class ThinDisk:
    """A qcow2 at ``path`` over ``base`` (raw), ``size`` bytes, written through ``qemu-nbd``.
    ``path`` must not exist: it is made here, and removed by :meth:`discard`."""

    def __init__(self, path: Path, base: Path, size: int, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.size = size
        self._client: NbdClient | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._created = False
        self._folder = Path(tempfile.mkdtemp(prefix="vmdelta-thin-"))
        try:
            try:  # claimed first, so that no user's file is ever written over
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                raise ConfigError(f"{self.path} exists; the handoff's disk is written to a new file") from None
            except OSError as exc:
                raise StorageError(f"cannot create {self.path}: {exc.strerror or exc}") from None
            self._created = True
            backing = str(Path(base).resolve())
            create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", str(self.path), str(size)]
            _run(create, "create the disk")
            socket_path = self._folder / "nbd.sock"
            self._server = subprocess.Popen(
                ["qemu-nbd", "-f", "qcow2", "--cache=writeback", "-k", str(socket_path), str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self._client = self._connect(socket_path, timeout)
        except BaseException:
            self.discard()
            raise

    def _connect(self, socket_path: Path, timeout: float) -> NbdClient:
        deadline = time.monotonic() + 10
        while True:
            assert self._server is not None
            if self._server.poll() is not None:
                raise StorageError(f"qemu-nbd failed: {_said(self._server)}")
            if socket_path.exists():
                with contextlib.suppress(StorageError):
                    return NbdClient(socket_path, "", timeout=timeout)
            if time.monotonic() > deadline:
                raise StorageError("qemu-nbd did not start in time")
            time.sleep(0.01)

    def write(self, offset: int, data: bytes) -> None:
        assert self._client is not None
        self._client.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        assert self._client is not None
        self._client.write_zeroes(offset, length)

    def finish(self) -> None:
        """Every block on the file, ``qemu-nbd`` gone (QEMU takes the image's lock when it
        resumes), and the image checked."""
        if self._client is not None:
            self._client.flush()
            self._client.close()
            self._client = None
        if self._server is not None:
            try:
                self._server.wait(30)
            except subprocess.TimeoutExpired:
                raise StorageError("qemu-nbd did not finish writing the disk") from None
            if self._server.returncode != 0:
                raise StorageError(f"qemu-nbd failed: {_said(self._server)}")
            _said(self._server)
            self._server = None
        _run(["qemu-img", "check", "-q", str(self.path)], "check the disk")
        shutil.rmtree(self._folder, ignore_errors=True)

    def discard(self) -> None:
        """Stop writing and remove the file (a failed handoff leaves no disk)."""
        if self._client is not None:
            self._client.sock.close()
            self._client = None
        if self._server is not None:
            self._server.kill()
            self._server.wait()
            _said(self._server)
            self._server = None
        if self._created:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._created = False
        shutil.rmtree(self._folder, ignore_errors=True)


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ConfigError(f"cannot {what}: {argv[0]}: {exc.strerror or exc} (install qemu-utils)") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise StorageError(f"cannot {what}: {lines[-1] if lines else f'{argv[0]} exited {done.returncode}'}")


def _said(process: subprocess.Popen[bytes]) -> str:
    """What a finished process printed on its standard error (its last line)."""
    text = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.stderr:
        process.stderr.close()
    lines = text.strip().splitlines()
    return lines[-1] if lines else f"exit status {process.returncode}"
