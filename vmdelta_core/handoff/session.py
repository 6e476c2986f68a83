"""The two hosts of a handoff, over the transport of ``schemas/transport-v1.md``.

The source connects with a hello that offers the handoff: the fingerprints of the bases it
relays against. The destination compares them with the bases it holds and answers ``ready`` or
an error line, before QEMU's migration is even started. A handoff that moves the guest's disk
says the disk's size; the destination then creates the thin qcow2 it writes the disk into (over
its base disk) before it starts QEMU. A source offers version 3 (references to pages sent
earlier); a destination takes versions 1 to 3. Then the relay (``schemas/handoff-v1.md``)
flows in chunks, a chunk of length 0 ends it, and the destination answers ``ok`` once its QEMU
has the whole stream, or an error line.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from vmdelta_core.components import SourceImage
from vmdelta_core.errors import BaseMismatchError, ConfigError, StorageError, VmdeltaError
from vmdelta_core.handoff.disk import ThinDisk
from vmdelta_core.handoff.relay import PAGE, HandoffBase, RelayReceiver
from vmdelta_core.index import load_or_build_index
from vmdelta_core.overlay.schema import Ref
from vmdelta_core.registry import Registry
from vmdelta_core.serve.protocol import (
    CHUNK_FIELD,
    MAGIC,
    MAX_CHUNK,
    MAX_HELLO,
    ChunkReader,
    TransportError,
    answer_line,
    error_line,
    error_of,
    kind_of,
    read_line,
    recv_exactly,
)
from vmdelta_core.serve.settings import QemuLaunch

__all__ = ["BaseSpec", "HandoffReceiver", "OpenedBases", "ReceiveConfig", "RelayChannel", "offer_handoff", "open_bases"]

log = logging.getLogger("vmdelta.handoff")

#: the relay's versions: 1 carries memory, 2 the disk too, 3 either with references to pages
#: sent earlier in the handoff (what a source offers)
VERSION = 1
DISK_VERSION = 2
EARLIER_VERSION = 3
VERSIONS = (VERSION, DISK_VERSION, EARLIER_VERSION)
#: a moved disk's size at most (the destination creates it before anything else)
MAX_DISK = 1 << 50


@attrs.frozen
class BaseSpec:
    """A base on this host: its kind (``memory`` or ``disk``), file, and source (detected when
    ``None``)."""

    kind: str
    path: Path = attrs.field(converter=Path)
    format: str | None = None


@attrs.define(eq=False)
class OpenedBases:
    """The bases of one end, open, with what the hello says of them."""

    bases: list[HandoffBase]
    offer: list[dict[str, Any]]
    stack: contextlib.ExitStack

    def close(self) -> None:
        self.stack.close()


def open_bases(specs: list[BaseSpec], registry: Registry, cache_dir: Path | None, *, lookup: bool) -> OpenedBases:
    """Open each base and find its index (cached, or built once); ``lookup``: keep the index for
    finding pages by hash (the source's side)."""
    stack = contextlib.ExitStack()
    bases, offer = [], []
    try:
        for spec in specs:
            if not spec.path.is_file():
                raise ConfigError(f"base {spec.path} does not exist or is not a file")
            source = spec.format or registry.detect_source(spec.path, spec.kind)
            image: SourceImage = stack.enter_context(
                registry.source(source).open(spec.path, kind=spec.kind, options={})
            )
            index, _ = load_or_build_index(spec.path, image, source=source, unit=PAGE, options={}, cache_dir=cache_dir)
            ref = Ref.BASE_MEM if spec.kind == "memory" else Ref.BASE_DISK
            bases.append(HandoffBase(ref, image, index if lookup else None))
            offer.append({"kind": spec.kind, "fingerprint": index.fingerprint, "size": index.size})
    except BaseException:
        stack.close()
        raise
    return OpenedBases(bases, offer, stack)


# ------------------------------------------------------------------------------------------------
# the source's side
# ------------------------------------------------------------------------------------------------


class RelayChannel:
    """A binary file sending what is written to it as transport chunks; :meth:`finish` sends the
    end and returns the destination's answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), MAX_CHUNK):
            piece = view[at : at + MAX_CHUNK]
            try:
                self.sock.sendall(CHUNK_FIELD.pack(len(piece)) + piece)
            except TimeoutError:
                raise TransportError("the destination took nothing for too long") from None
            except OSError as exc:
                raise self._why(f"connection lost while sending: {exc.strerror or exc}") from None
            self.sent += len(piece)
        return len(view)

    def flush(self) -> None:
        """Chunks are sent as they are written."""

    def _why(self, message: str) -> VmdeltaError:
        with contextlib.suppress(TransportError):
            answer = read_line(self.sock)
            if answer["status"] == "error":
                return TransportError(f"the destination stopped: {answer.get('message')}")
        return TransportError(message)

    def finish(self) -> dict[str, Any]:
        try:
            self.sock.sendall(CHUNK_FIELD.pack(0))
        except OSError as exc:
            raise self._why(f"connection lost while sending: {exc.strerror or exc}") from None
        answer = read_line(self.sock)
        if answer["status"] != "ok":
            raise TransportError(f"the destination failed: {answer.get('message')}")
        return answer


def offer_handoff(
    host: str,
    port: int,
    *,
    token: str,
    name: str | None,
    offer: list[dict[str, Any]],
    timeout: float,
    disk_size: int | None = None,
) -> socket.socket:
    """Connect, offer the handoff (of version 3; it moves a disk of ``disk_size`` bytes when
    given) and wait for ``ready``; the connected socket.

    :raises BaseMismatchError: the destination lacks a base (nothing was migrated yet).
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    try:
        handoff: dict[str, Any] = {"version": EARLIER_VERSION, "bases": offer}
        if disk_size is not None:
            handoff["disk"] = {"size": disk_size}
        hello = json.dumps({"handoff": handoff, "name": name, "token": token}).encode()
        if len(hello) > MAX_HELLO:
            raise ConfigError("the handoff's hello is too long")
        sock.sendall(MAGIC + CHUNK_FIELD.pack(len(hello)) + hello)
        answer = read_line(sock)
        if answer["status"] != "ready":
            message = str(answer.get("message"))
            if answer.get("error") == "base":
                raise BaseMismatchError(f"the destination refused the handoff: {message}")
            raise TransportError(f"the destination refused the handoff: {message}")
    except BaseException:
        sock.close()
        raise
    return sock


# ------------------------------------------------------------------------------------------------
# the destination's side
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class ReceiveConfig:
    """What the destination needs: where to listen, the shared token, its bases and the VM's
    command (``-incoming fd:0``; its standard input is the migration stream); ``disk``: the new
    qcow2 a moved disk is written to (``{disk0}`` in the command)."""

    host: str
    port: int
    token: str = attrs.field(repr=False)
    bases: tuple[BaseSpec, ...]
    qemu: QemuLaunch
    timeout: float = 60.0
    cache_dir: Path | None = None
    disk: Path | None = None


class HandoffReceiver:
    """Receives one handoff: checks the offer, starts QEMU, feeds it the stream put together."""

    def __init__(self, config: ReceiveConfig, registry: Registry) -> None:
        if config.disk is not None and not config.qemu.disks:
            raise ConfigError("the VM's command must name the moved disk: {disk0} stands for it")
        if config.disk is None and config.qemu.disks:
            raise ConfigError("{disk0} in the VM's command stands for a moved disk: give --disk")
        if config.qemu.disks > 1:
            raise ConfigError("one disk moves: the VM's command names it {disk0}")
        if not any(spec.kind == "disk" for spec in config.bases) and config.disk is not None:
            raise ConfigError("a moved disk is written over the base disk: give --disk-base")
        self.config = config
        self.opened = open_bases(list(config.bases), registry, config.cache_dir, lookup=False)
        self._listener = socket.create_server((config.host, config.port))
        self._listener.settimeout(0.5)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        self.opened.close()

    def __enter__(self) -> HandoffReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_one(
        self, deadline: float | None = None, on_progress: Callable[[dict[str, int]], None] | None = None
    ) -> dict[str, Any]:
        """Wait for a source (refusing those with a wrong token), receive its handoff and return
        the answer it was given. ``on_progress`` is told twice a second what came: bytes on the
        wire (``received``), of QEMU's stream written (``stream_bytes``), disk blocks written.

        :raises VmdeltaError: the handoff was refused or failed (the source was told why, and
            no VM was left).
        """
        while True:
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportError("no source connected in time") from None
                continue
            with conn:
                conn.settimeout(self.config.timeout)
                try:
                    return self._converse(conn, f"{peer[0]}:{peer[1]}", on_progress)
                except _Refused as refused:
                    log.warning("refused %s:%s: %s", peer[0], peer[1], refused)
                    with contextlib.suppress(OSError):
                        conn.sendall(error_line(refused.kind, str(refused)))
                    if refused.kind != "auth":
                        raise error_of(refused.kind, str(refused)) from None

    def _converse(
        self, conn: socket.socket, peer: str, on_progress: Callable[[dict[str, int]], None] | None
    ) -> dict[str, Any]:
        offer, name, version, disk_size = self._hello(conn)
        self._check_bases(offer)
        self._check_disk(offer, disk_size)
        disk = self._disk(disk_size)
        try:
            conn.sendall(answer_line({"status": "ready"}))
            chunks = ChunkReader(conn, record=False)
            with self._vm(name, disk) as (vm, pipe):

                def told(relay: RelayReceiver) -> None:
                    if on_progress is not None:
                        on_progress(
                            {
                                "received": chunks.received,
                                "stream_bytes": relay.written,
                                "disk_blocks": relay.disk_blocks,
                            }
                        )

                what = f"handoff from {peer}"
                receiver = RelayReceiver(pipe, self.opened.bases, what, version=version, disk=disk, on_progress=told)
                try:
                    written = receiver.receive(chunks)  # type: ignore[arg-type]
                    pipe.close()  # the whole stream: QEMU resumes the VM
                except (VmdeltaError, OSError) as exc:
                    _stop(vm)
                    failure = (
                        exc
                        if isinstance(exc, VmdeltaError)
                        else StorageError(f"writing to QEMU: {exc.strerror or exc}")
                    )
                    log.warning("handoff from %s failed: %s", peer, failure)
                    with contextlib.suppress(OSError):
                        conn.sendall(error_line(kind_of(failure), str(failure)))
                    raise failure from None
        except BaseException:
            if disk is not None:
                disk.discard()  # after QEMU stopped: no VM and no disk are left
            raise
        threading.Thread(target=vm.wait, name=f"vmdelta-vm-{vm.pid}", daemon=True).start()  # no zombie
        answer = {"status": "ok", "stream_bytes": written, "received": chunks.received, "vm": {"pid": vm.pid}}
        if disk is not None:
            answer["disk"] = {"path": str(disk.path), "blocks": receiver.disk_blocks}
        conn.sendall(answer_line(answer))
        log.info("handoff from %s: %d bytes of stream from %d received; VM %d", peer, written, chunks.received, vm.pid)
        return answer

    def _hello(self, conn: socket.socket) -> tuple[list[dict[str, Any]], str, int, int | None]:
        if recv_exactly(conn, len(MAGIC), "the magic") != MAGIC:
            raise _Refused("format", "not a vmdelta transport connection")
        (length,) = CHUNK_FIELD.unpack(recv_exactly(conn, CHUNK_FIELD.size, "the hello's length"))
        if length > MAX_HELLO:
            raise _Refused("format", f"a hello of {length} bytes; at most {MAX_HELLO}")
        try:
            hello = json.loads(recv_exactly(conn, length, "the hello"))
        except ValueError:
            raise _Refused("format", "the hello is not JSON") from None
        if not isinstance(hello, dict) or not isinstance(hello.get("token"), str):
            raise _Refused("format", "the hello is not an object with a token")
        if not hmac.compare_digest(hello["token"].encode(), self.config.token.encode()):
            raise _Refused("auth", "wrong token")
        handoff = hello.get("handoff")
        version = handoff.get("version") if isinstance(handoff, dict) else None
        if type(version) is not int or version not in VERSIONS:  # JSON's true would equal 1
            raise _Refused("format", f"not a handoff of version {VERSIONS[0]} to {VERSIONS[-1]}")
        disk_size = None
        if version == DISK_VERSION or (version == EARLIER_VERSION and "disk" in handoff):
            disk = handoff.get("disk")
            disk_size = disk.get("size") if isinstance(disk, dict) else None
            if type(disk_size) is not int or not 0 < disk_size <= MAX_DISK or disk_size % PAGE:
                raise _Refused("format", "the handoff's disk has no size in whole blocks")
        bases = handoff.get("bases")
        if not isinstance(bases, list) or not all(isinstance(b, dict) for b in bases):
            raise _Refused("format", "the handoff's bases are not a list of objects")
        name = hello.get("name")
        return bases, name if isinstance(name, str) else "vm", version, disk_size

    def _check_bases(self, offer: list[dict[str, Any]]) -> None:
        """Every base the source relays against must be one held here, by fingerprint."""
        held = {(o["kind"], o["fingerprint"]) for o in self.opened.offer}
        for base in offer:
            if (base.get("kind"), base.get("fingerprint")) not in held:
                raise _Refused(
                    "base",
                    f"this host holds no {base.get('kind')} base with fingerprint {str(base.get('fingerprint'))[:80]}",
                )
        kinds = {b.get("kind") for b in offer}
        if "memory" not in kinds:
            raise _Refused("base", "a handoff relays against a memory base; the offer holds none")

    def _check_disk(self, offer: list[dict[str, Any]], disk_size: int | None) -> None:
        """A moved disk needs a disk base and a file to write it to; a kept one, neither file."""
        if disk_size is None:
            if self.config.disk is not None:
                raise _Refused("config", f"the source keeps its disk; this end expected it in {self.config.disk}")
            return
        if self.config.disk is None:
            raise _Refused("config", "the source moves its disk; this end has no file to write it to (--disk)")
        if not any(b.get("kind") == "disk" for b in offer):
            raise _Refused("base", "a moved disk is written over a disk base; the offer holds none")
        if self.config.disk.exists():
            raise _Refused("config", f"{self.config.disk} exists; the moved disk is written to a new file")

    def _disk(self, disk_size: int | None) -> ThinDisk | None:
        if disk_size is None or self.config.disk is None:
            return None
        base = next(spec.path for spec in self.config.bases if spec.kind == "disk")
        try:
            return ThinDisk(self.config.disk, base, disk_size, self.config.timeout)
        except VmdeltaError as exc:
            raise _Refused(kind_of(exc), str(exc)) from None

    @contextlib.contextmanager
    def _vm(self, name: str, disk: ThinDisk | None) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
        """QEMU, its standard input the pipe the stream goes to."""
        argv = self.config.qemu.argv(name, [disk.path] if disk is not None else [])
        read, write = os.pipe()
        try:
            vm = subprocess.Popen(argv, stdin=read, stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            os.close(write)
            raise ConfigError(f"cannot start the VM ({argv[0]}): {exc.strerror or exc}") from None
        finally:
            os.close(read)
        pipe = os.fdopen(write, "wb")
        try:
            yield vm, pipe
        except BaseException:
            _stop(vm)
            raise
        finally:
            with contextlib.suppress(OSError):
                pipe.close()


class _Refused(VmdeltaError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _stop(vm: subprocess.Popen[bytes]) -> None:
    if vm.poll() is None:
        vm.terminate()
        try:
            vm.wait(5)
        except subprocess.TimeoutExpired:
            vm.kill()
            vm.wait()
