"""``vmdelta serve``: a cloudlet receiving overlays over TCP and rebuilding their VMs from the
bases it holds.

One connection carries one overlay, served by a thread of its own. Nothing a client sends names
a path: the outputs go into a folder of the output folder named after the client's requested
name (sanitised) or a connection id, and each file in it after its image's kind and number.
Bases are found by the fingerprint the overlay's prologue records, before any frame is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import itertools
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import attrs

from vmdelta_core.apply import apply_overlay
from vmdelta_core.baseimage import open_base_image
from vmdelta_core.components import SourceImage
from vmdelta_core.config import ApplyConfig, ApplyImageSpec
from vmdelta_core.errors import BaseMismatchError, ConfigError, VmdeltaError
from vmdelta_core.index import load_or_build_index
from vmdelta_core.overlay.digest import ImageDigest, digest_kind
from vmdelta_core.overlay.metadata import ImageRecord, OverlayMetadata
from vmdelta_core.overlay.stream import StreamReader
from vmdelta_core.registry import Registry, default_registry
from vmdelta_core.serve.protocol import (
    CHUNK_FIELD,
    MAGIC,
    MAX_HELLO,
    ChunkReader,
    TransportError,
    answer_line,
    error_line,
    kind_of,
    recv_exactly,
    unpack_hello,
)
from vmdelta_core.serve.settings import QemuLaunch, ServeConfig, ServedBase

__all__ = ["BaseCatalog", "CatalogEntry", "OverlayServer", "target_name"]

log = logging.getLogger("vmdelta.serve")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 64
#: how long a refused client's remaining bytes are read and dropped, so that the refusal is
#: read before the connection closes (closing with unread data resets it)
_DRAIN_SECONDS = 2.0
_DRAIN_BYTES = 64 << 20
#: how long a VM whose stream failed has to exit after SIGTERM before it is killed
_TERMINATE_SECONDS = 5.0
#: the memory output that is the launched VM's standard input
_STDOUT = Path("-")


class Refused(VmdeltaError):
    """A connection the server will not serve: ``kind`` says why on the wire."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def target_name(requested: str | None, ident: str) -> str:
    """The folder a connection's outputs go to: the requested name with everything but letters,
    digits, ``.``, ``_`` and ``-`` replaced, no leading dot, at most 64 characters; the
    connection's id when nothing is left."""
    if requested:
        name = _UNSAFE.sub("_", requested).lstrip(".")[:_MAX_NAME]
        if name.strip("_"):
            return name
    return ident


def _shown(text: str, limit: int = 80) -> str:
    """A client's text for a log line or a message: escaped, bounded."""
    return repr(text[:limit])


@attrs.frozen
class CatalogEntry:
    base: ServedBase
    source: str
    size: int
    fingerprint: str
    #: the base as its source opened it, shared by every connection
    image: SourceImage | None = attrs.field(default=None, eq=False, repr=False)


class BaseCatalog:
    """The bases the server holds, known by fingerprint (computed once, at start, through the
    index cache), and held open: each connection reads them as they are rather than opening
    them again (for a QEMU base: parsing its stream and laying out its RAM)."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        self.entries = entries
        self._by_fingerprint = {entry.fingerprint: entry for entry in entries}

    @classmethod
    def build(cls, bases: tuple[ServedBase, ...], registry: Registry, cache_dir: Path | None) -> BaseCatalog:
        entries: list[CatalogEntry] = []
        try:
            for base in bases:
                if not base.path.is_file():
                    raise ConfigError(f"base {base.path} does not exist or is not a file")
                source = base.format or registry.detect_source(base.path, base.kind)
                options = base.open_options()
                image = open_base_image(
                    registry.source(source), source, base.path, kind=base.kind, options=options, cache_dir=cache_dir
                )
                entries.append(CatalogEntry(base, source, image.size, "", image))
                index, _ = load_or_build_index(
                    base.path, image, source=source, unit=4096, options=options, cache_dir=cache_dir
                )
                entries[-1] = attrs.evolve(entries[-1], size=index.size, fingerprint=index.fingerprint)
                log.info("base %s (%s, %s, %d bytes): %s", base.path, base.kind, source, index.size, index.fingerprint)
        except BaseException:
            cls(entries).close()
            raise
        return cls(entries)

    def held(self) -> dict[Path, SourceImage]:
        """The open bases, by path, for :func:`apply_overlay`."""
        return {entry.base.path: entry.image for entry in self.entries if entry.image is not None}

    def close(self) -> None:
        """Close the bases (no connection may be reading them)."""
        for entry in self.entries:
            if entry.image is not None:
                entry.image.close()

    def find(self, image: ImageRecord) -> CatalogEntry:
        """The base ``image`` was made against.

        :raises BaseMismatchError: the server holds none.
        """
        entry = self._by_fingerprint.get(image.base.fingerprint)
        if entry is None or entry.base.kind != image.kind or digest_kind(image.base.fingerprint) is not ImageDigest:
            raise BaseMismatchError(
                f"this server holds no {image.kind} base with fingerprint {image.base.fingerprint[:80]} "
                f"({_shown(image.base.name)}, {image.base.size} bytes)"
            )
        return entry


class OverlayServer:
    """Listens, and serves each connection in a thread of its own (:meth:`serve_forever`);
    :meth:`stop` closes the listening socket and breaks off every connection, whose outputs then
    never appear."""

    def __init__(self, config: ServeConfig, catalog: BaseCatalog, registry: Registry | None = None) -> None:
        self.config = config
        self.catalog = catalog
        self.registry = registry or default_registry()
        self._tls = _tls_context(config)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._targets: set[str] = set()
        self._connections: dict[str, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._listener = socket.create_server(
            (config.host, config.port),
            family=socket.AF_INET6 if ":" in config.host else socket.AF_INET,
            backlog=min(config.max_connections, 128),
        )
        self._listener.settimeout(0.2)  # accept wakes up this often to see a stop
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        config.output.mkdir(parents=True, exist_ok=True)
        log.info("listening on %s:%d%s", self.address[0], self.address[1], " (TLS)" if self._tls else "")

    def __enter__(self) -> OverlayServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop` (or a signal in the calling thread)."""
        self._acceptor = threading.current_thread()
        try:
            while not self._stopping.is_set():
                try:
                    conn, peer = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stopping.is_set():
                        return
                    raise
                self._start(conn, f"{peer[0]}:{peer[1]}")
        finally:
            self.stop()

    def _start(self, conn: socket.socket, peer: str) -> None:
        ident = f"c{next(self._ids):06d}-{int(time.time())}"
        if not self._slots.acquire(blocking=False):
            log.warning("refused %s: %d connections already", peer, self.config.max_connections)
            with contextlib.suppress(OSError):
                conn.sendall(error_line("busy", "too many connections; try again later"))
            conn.close()
            return
        thread = threading.Thread(target=self._serve, args=(conn, peer, ident), name=f"vmdelta-{ident}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def stop(self, wait: float = 10.0) -> None:
        """Stop listening and break off every connection (its outputs are discarded)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            # shutdown first: it wakes an accept blocked in another thread, and stops listening
            # at once (a close alone waits for that accept to return)
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            connections, threads = list(self._connections.values()), list(self._threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                # the plain socket's shutdown, under TLS too: the blocked read then ends
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        deadline = time.monotonic() + wait
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            threads.append(self._acceptor)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in threads):
            self.catalog.close()  # no connection reads the bases any more

    # ----------------------------------------------------------------------------------------
    # one connection
    # ----------------------------------------------------------------------------------------

    def _serve(self, raw: socket.socket, peer: str, ident: str) -> None:
        conn = raw
        try:
            raw.settimeout(self.config.timeout)
            with self._lock:
                self._connections[ident] = raw
            if self._stopping.is_set():
                return
            if self._tls is not None:
                try:
                    conn = self._tls.wrap_socket(raw, server_side=True)
                except (OSError, ValueError) as exc:
                    log.warning("refused %s: TLS handshake failed (%s)", peer, exc)
                    return
                with self._lock:
                    self._connections[ident] = conn  # the raw socket gave its descriptor to it
            self._converse(conn, peer, ident)
        finally:
            with self._lock:
                self._connections.pop(ident, None)
            with contextlib.suppress(OSError):
                conn.close()
            self._slots.release()

    def _converse(self, conn: socket.socket, peer: str, ident: str) -> None:
        target: str | None = None
        try:
            token, requested = self._hello(conn)
            if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.config.token.encode()):
                raise Refused("auth", "wrong token")
            name = target_name(requested, ident)
            with self._lock:
                if name in self._targets:
                    raise Refused("busy", f"another connection is writing {name!r}")
                self._targets.add(name)
                target = name
            answer = self._receive(conn, peer, ident, target)
        except Refused as exc:
            log.warning("refused %s: %s", peer, exc)
            failure = error_line(exc.kind, str(exc))
        except VmdeltaError as exc:
            log.warning("failed %s (%s): %s", peer, target or ident, exc)
            failure = error_line(kind_of(exc), str(exc))
        except Exception as exc:  # a bug: the client hears of it and the server goes on
            log.exception("failed %s (%s): internal error", peer, target or ident)
            failure = error_line("internal", f"internal error: {type(exc).__name__}")
        else:
            failure = None
            log.info("served %s: %s", peer, target)
        finally:
            # the name is free again before the client hears the answer, so that it may send again
            if target is not None:
                with self._lock:
                    self._targets.discard(target)
        if failure is not None:
            self._answer_and_drain(conn, failure)
            return
        with contextlib.suppress(OSError):
            conn.sendall(answer)

    def _hello(self, conn: socket.socket) -> tuple[str, str | None]:
        try:
            magic = recv_exactly(conn, len(MAGIC), "the magic")
        except TransportError as exc:
            raise Refused("format", f"no hello ({exc})") from None
        if magic != MAGIC:
            raise Refused("format", "not the vmdelta transport (bad magic)")
        (length,) = CHUNK_FIELD.unpack(recv_exactly(conn, CHUNK_FIELD.size, "the hello"))
        if length > MAX_HELLO:
            raise Refused("format", f"a hello of {length} bytes; at most {MAX_HELLO}")
        try:
            return unpack_hello(recv_exactly(conn, length, "the hello"))
        except TransportError as exc:
            raise Refused("format", str(exc)) from None

    def _receive(self, conn: socket.socket, peer: str, ident: str, target: str) -> bytes:
        """Read the prologue, find the bases, say ready, apply: the answer line."""
        chunks = ChunkReader(conn)
        label = f"overlay from {peer}"
        prologue = StreamReader(chunks, label).prologue  # type: ignore[arg-type]
        meta = OverlayMetadata.from_json(prologue, [], prologue=True)
        folder = self.config.output / target
        specs = [self._spec(meta, number, self.catalog.find(image), folder) for number, image in enumerate(meta.images)]
        if not specs:
            raise Refused("format", "the overlay holds no image")
        launch = self.config.qemu
        argv = None
        if launch is not None:
            argv = self._argv(launch, target, specs)
            specs = [
                attrs.evolve(spec, output=_STDOUT, output_sides={}) if spec.kind == "memory" else spec for spec in specs
            ]
        conn.sendall(answer_line({"status": "ready", "target": target}))
        chunks.replay()
        made = not folder.exists()
        folder.mkdir(exist_ok=True)
        started: list[subprocess.Popen[bytes]] = []
        held: list[int] = []  # the files of the disks a VM was handed early
        pipe = _MemoryPipe() if argv is not None else None

        def start(disks: list[Path] | None = None) -> None:
            assert launch is not None and argv is not None and pipe is not None
            command = argv if disks is None else _with_disks(launch, target, specs, disks)
            started.append(_launch(command, target, pipe.reader))
            pipe.close_reader()

        def start_early(fds: Mapping[int, int]) -> None:
            """Start the VM now if every disk it names is rebuilt in the file it will be: QEMU
            opens them as it starts and reads them only once its memory stream ends. It opens them
            through ``/proc`` as this process holds them, unnamed until the commit; this process
            keeps them open until the VM exits, so that QEMU can open them again."""
            assert launch is not None
            numbers = [number for number, spec in enumerate(specs) if spec.kind == "disk"][: launch.disks]
            if all(number in fds for number in numbers):
                held.extend(os.dup(fds[number]) for number in numbers)
                start([Path(f"/proc/{os.getpid()}/fd/{fd}") for fd in held])

        def start_late() -> None:
            if not started:
                start()

        # a VM opens its disks when it starts: it starts at once when it can be handed the files
        # its disks are rebuilt in, or names none; else once they are in place (the memory stream
        # waits in the pipe meanwhile)
        names_disks = argv is not None and any(
            str(spec.output) in arg for spec in specs if spec.kind == "disk" for arg in argv
        )
        try:
            if pipe is not None and not names_disks:
                start()
            report = apply_overlay(
                ApplyConfig(
                    overlay=Path(label), images=specs, threads=self.config.threads, cache_dir=self.config.cache_dir
                ),
                registry=self.registry,
                stream=chunks,  # type: ignore[arg-type]
                stdout=None if pipe is None else pipe.writer,
                on_outputs=start_early if names_disks else None,
                on_committed=start_late if names_disks else None,
                bases=self.catalog.held(),
            )
            if pipe is not None:
                pipe.writer.close()  # the stream is whole: QEMU resumes
        except BaseException:
            if pipe is not None:
                pipe.close()
            if started:
                _abort(started[0], target)
            _close(held)
            if made:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: nothing appeared in it
            raise
        outputs = [
            {"image": r.name, "kind": r.kind, "file": r.output.name, "size": r.size, "digest": r.digest}
            for r in report.images
        ]
        answer = {"status": "ok", "target": target, "outputs": outputs, "seconds": round(report.seconds, 3)}
        vm = started[0] if started else None
        if vm is not None:
            log.info("started VM %s: process %d", target, vm.pid)
            threading.Thread(target=_reap, args=(vm, target, held), name=f"vmdelta-vm-{target}", daemon=True).start()
            answer["vm"] = {"status": "started", "pid": vm.pid}
        return answer_line(answer)

    def _argv(self, launch: QemuLaunch, target: str, specs: list[ApplyImageSpec]) -> list[str]:
        """The VM's command for this overlay, which must hold exactly one memory image (the
        stream the VM resumes from) and every disk the template names."""
        memories = sum(1 for spec in specs if spec.kind == "memory")
        if memories != 1:
            raise Refused("config", f"this server starts a VM from one memory image; the overlay holds {memories}")
        try:
            return launch.argv(target, [spec.output for spec in specs if spec.kind == "disk"])
        except ConfigError as exc:
            raise Refused("config", str(exc)) from None

    def _spec(self, meta: OverlayMetadata, number: int, entry: CatalogEntry, folder: Path) -> ApplyImageSpec:
        """Where image ``number`` is rebuilt: named after its kind and its number among its kind's,
        never after anything in the overlay."""
        image = meta.images[number]
        same_kind = sum(1 for other in meta.images[:number] if other.kind == image.kind)
        stem = "memory" if image.kind == "memory" else f"disk{same_kind}"
        return ApplyImageSpec(
            image.kind,
            entry.base.path,
            folder / stem,
            base_options=dict(entry.base.options),
            base_sides=dict(entry.base.sides),
            output_sides={name: folder / f"{stem}.{name}" for name in entry.base.sides},
        )

    def _answer_and_drain(self, conn: socket.socket, line: bytes) -> None:
        """Send ``line``, then read and drop what the client still sends, for a little while:
        closing with unread bytes would reset the connection, and the client might lose the
        line."""
        with contextlib.suppress(OSError):
            conn.sendall(line)
            conn.settimeout(_DRAIN_SECONDS)
            deadline, dropped = time.monotonic() + _DRAIN_SECONDS, 0
            while time.monotonic() < deadline and dropped < _DRAIN_BYTES:
                data = conn.recv(1 << 16)
                if not data:
                    break
                dropped += len(data)


class _MemoryPipe:
    """The pipe the memory stream goes through to the VM: made before the VM starts, so that the
    stream can wait in it (the VM may start only once its disks are in place)."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # a larger buffer where Linux allows it
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.reader: int | None = read_fd
        self.writer = os.fdopen(write_fd, "wb")

    def close_reader(self) -> None:
        if self.reader is not None:
            os.close(self.reader)
            self.reader = None

    def close(self) -> None:
        self.close_reader()
        with contextlib.suppress(OSError):
            self.writer.close()


def _with_disks(launch: QemuLaunch, target: str, specs: list[ApplyImageSpec], early: list[Path]) -> list[str]:
    """The VM's command with its first disks at the paths ``early`` (the rest where they go)."""
    disks = [spec.output for spec in specs if spec.kind == "disk"]
    disks[: len(early)] = early
    return launch.argv(target, disks)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _launch(argv: list[str], target: str, stdin: int | None) -> subprocess.Popen[bytes]:
    """The VM's process, its standard input the memory pipe; a session of its own, so that a
    signal to the server (a Ctrl-C) does not reach the VMs it started."""
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise ConfigError(f"cannot start the VM for {target} ({argv[0]}): {exc.strerror or exc}") from None


def _reap(vm: subprocess.Popen[bytes], target: str, held: list[int]) -> None:
    """Wait for a started VM to exit (so that it leaves no zombie), log it, and close the files
    held open for it."""
    log.info("VM %s (process %d) exited with status %d", target, vm.pid, vm.wait())
    _close(held)


def _abort(vm: subprocess.Popen[bytes], target: str) -> None:
    """The stream failed: close the pipe without its end (QEMU's load fails), then make sure the
    process is gone."""
    with contextlib.suppress(OSError):
        vm.terminate()
    try:
        vm.wait(_TERMINATE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            vm.kill()
        vm.wait()
    log.warning("stopped the VM for %s (process %d): its memory stream failed", target, vm.pid)


def _tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # no session tickets: the first bytes a client reads are then the server's answer
    context.num_tickets = 0
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {config.tls_cert} or key {config.tls_key}: {exc}") from None
    return context
