"""The source host of a handoff: QEMU's live migration driven through QMP, its stream relayed.

vmdelta hands QEMU one end of a pipe (``getfd`` over the monitor socket) and migrates to it
(``migrate fd:``); it reads the other end only as fast as the link to the destination drains,
so QEMU's own bandwidth estimate, dirty-page passes and downtime limit work as designed. The
migration's capabilities and parameters pass through. Should anything fail, the migration is
cancelled and the VM goes on running here.

When the disk moves (the guest runs from a qcow2 overlay over the base disk), a dirty bitmap is
started on the drive and the overlay's clusters are sent before the migration starts, read
through QEMU (:class:`~vmdelta_core.handoff.disk.DriveExport`); between passes over memory (once
a second at most) the blocks the guest wrote meanwhile follow. The migration runs with
``pause-before-switchover``: once QEMU has stopped the guest, the blocks written since the last
pass are sent, and only then is QEMU let go on to the device state the destination resumes from.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from vmdelta_core.errors import ConfigError, PluginError, StorageError, VmdeltaError
from vmdelta_core.handoff.disk import DriveExport, find_drive
from vmdelta_core.handoff.relay import RelaySender, RelayStatistics
from vmdelta_core.handoff.session import EARLIER_VERSION, BaseSpec, RelayChannel, offer_handoff, open_bases
from vmdelta_core.registry import Registry, default_registry

__all__ = ["HandoffReport", "SendConfig", "hand_off"]

_FD_NAME = "vmdelta-handoff"
#: how often progress is told (QEMU asked how the migration goes)
_PROGRESS_SECONDS = 0.5
#: a pass over the blocks the guest wrote, at most this often while memory migrates
_DISK_PASS_SECONDS = 1.0
#: how long QEMU's monitor may take to greet
_MONITOR_SECONDS = 10.0


@attrs.frozen
class SendConfig:
    """The running VM (its QMP socket), where it goes, and the bases both hosts hold."""

    qmp: Path = attrs.field(converter=Path)
    host: str
    port: int
    token: str = attrs.field(repr=False)
    bases: tuple[BaseSpec, ...]
    name: str | None = None
    #: migrate-set-capabilities, by name (the relay carries plain precopy only)
    capabilities: Mapping[str, bool] = attrs.field(factory=dict)
    #: migrate-set-parameters, as QMP takes them (``downtime-limit`` in ms, ...)
    parameters: Mapping[str, Any] = attrs.field(factory=dict)
    timeout: float = 60.0
    cache_dir: Path | None = None
    #: move the guest's disk (a qcow2 overlay over the disk base) instead of sharing it
    move_disk: bool = False
    #: the drive that moves (``-drive id`` or node name); by default the VM's only qcow2 drive
    drive: str | None = None


@attrs.frozen
class HandoffReport:
    """What a handoff did: its time, QEMU's own figures, the relay's statistics."""

    seconds: float
    qemu: Mapping[str, Any]
    relay: RelayStatistics
    destination: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "downtime_ms": self.qemu.get("downtime"),
            "qemu": dict(self.qemu),
            "relay": self.relay.as_json(),
            "destination": dict(self.destination),
        }


def hand_off(
    config: SendConfig,
    registry: Registry | None = None,
    on_progress: Callable[[RelayStatistics, Mapping[str, Any]], None] | None = None,
) -> HandoffReport:
    """Move the VM behind ``config.qmp`` (and its disk, with ``config.move_disk``) to the
    destination; when this returns, the destination's QEMU has the whole stream and this VM is
    paused (QEMU's ``postmigrate``). ``on_progress`` is called twice a second with the relay's
    statistics and QEMU's view of the migration."""
    try:
        import qemu.qmp.legacy  # noqa: F401
    except ImportError:
        raise ConfigError("a handoff talks to QEMU through qemu.qmp: pip install 'vmdelta-core[handoff]'") from None

    registry = registry or default_registry()
    started = time.monotonic()
    memory = next((spec for spec in config.bases if spec.kind == "memory"), None)
    if memory is None:
        raise ConfigError("a handoff relays against a memory base: give --memory-base")
    opened = open_bases(list(config.bases), registry, config.cache_dir, lookup=True)
    with contextlib.ExitStack() as stack:
        stack.callback(opened.close)
        source = registry.source(memory.format or registry.detect_source(memory.path, "memory"))
        split = getattr(source, "split_live", None)
        if split is None:
            raise PluginError(f"the {source.name} source cannot read a live migration stream")
        qmp = _connect(config.qmp)
        stack.callback(qmp.close)
        qmp.settimeout(config.timeout)
        drive = None
        if config.move_disk:
            disk = next((spec for spec in config.bases if spec.kind == "disk"), None)
            if disk is None:
                raise ConfigError("a moved disk is sent against its base: give --disk-base")
            drive = find_drive(qmp, config.drive, disk.path)
        sock = offer_handoff(
            config.host,
            config.port,
            token=config.token,
            name=config.name,
            offer=opened.offer,
            timeout=config.timeout,
            disk_size=drive["size"] if drive else None,
        )
        stack.callback(sock.close)
        channel = RelayChannel(sock)
        sender = RelaySender(channel, opened.bases, version=EARLIER_VERSION)
        try:
            _prepare(qmp, config, pause=drive is not None)
            export = None
            if drive is not None:
                export = DriveExport(qmp, drive["node"], config.timeout)
                stack.callback(export.close)
                sender.disk_pass(_telling(export.allocated(), sender, on_progress), 0)
            read = _migrate_to_pipe(qmp)
            _relay(qmp, read, split, sender, export, on_progress)
            answer = channel.finish()
            info = _completed(qmp, config.timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                qmp.cmd("migrate_cancel")  # the VM goes on running here
            raise
        finally:
            if drive is not None:
                with contextlib.suppress(Exception):
                    _pause_before_switchover(qmp, False)
    return HandoffReport(time.monotonic() - started, info, sender.stats, answer)


def _telling(
    blocks: Iterator[tuple[int, bytes]],
    sender: RelaySender,
    on_progress: Callable[[RelayStatistics, Mapping[str, Any]], None] | None,
) -> Iterator[tuple[int, bytes]]:
    """``blocks`` as they are, progress told on the way (no view of QEMU's yet: the migration
    has not started)."""
    told = time.monotonic()
    for block in blocks:
        yield block
        if on_progress is not None and time.monotonic() - told > _PROGRESS_SECONDS:
            told = time.monotonic()
            on_progress(sender.stats, {})


def _connect(path: Path) -> Any:
    from qemu.qmp import QMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(str(path))
    qmp.settimeout(_MONITOR_SECONDS)
    try:
        qmp.connect()
    except TimeoutError:
        raise ConfigError(
            f"QEMU's monitor at {path} did not greet in {_MONITOR_SECONDS:g} s: it serves one client "
            "at a time, so close the other one"
        ) from None
    except (OSError, QMPError) as exc:
        raise ConfigError(f"cannot reach QEMU's monitor at {path}: {exc}") from None
    return qmp


_END = object()


class _Tokens:
    """The tokens of QEMU's stream, handed from the thread that splits it to the one that relays
    them: at most ``limit`` wait, so that QEMU waits on the link, except while the relaying
    thread talks to QEMU (:meth:`unbounded`). QEMU answers its monitor only under its big
    lock, which its migration holds while it writes the end of the stream: were that write
    waiting on the relaying thread, and the relaying thread on QEMU's answer, neither would go
    on."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()
        self._unbounded = self._closed = False

    def put(self, item: Any) -> None:
        with self._ready:
            while len(self._items) >= self.limit and not (self._unbounded or self._closed):
                self._ready.wait(0.1)
            self._items.append(item)
            self._ready.notify_all()

    def get(self, timeout: float) -> Any:
        """The next token; :class:`queue.Empty` when none came in ``timeout`` seconds."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            if not self._items:
                raise queue.Empty
            item = self._items.popleft()
            self._ready.notify_all()
            return item

    @contextlib.contextmanager
    def unbounded(self) -> Iterator[None]:
        with self._ready:
            self._unbounded = True
            self._ready.notify_all()
        try:
            yield
        finally:
            with self._ready:
                self._unbounded = False

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()


def _relay(
    qmp: Any,
    read: int,
    split: Callable[[Any], Any],
    sender: RelaySender,
    export: DriveExport | None,
    on_progress: Callable[[RelayStatistics, Mapping[str, Any]], None] | None,
) -> None:
    """Relay QEMU's stream as it comes. A thread splits it, handing the tokens over a short
    queue (QEMU still waits on the link); while none come, QEMU is asked whether it paused
    before the switchover, when the disk's last pass is sent and QEMU let go on."""
    tokens = _Tokens(256)

    def split_stream() -> None:
        try:
            with open(read, "rb", buffering=0) as stream:
                for token in split(stream):
                    tokens.put(token)
            tokens.put(_END)
        except BaseException as exc:  # handed to the relaying thread, which raises it
            tokens.put(exc)

    reader = threading.Thread(target=split_stream, name="vmdelta-handoff-split", daemon=True)
    reader.start()
    try:
        sampled, waiting, disk_pass = 0.0, export is not None, time.monotonic()
        while True:
            try:
                token = tokens.get(timeout=0.05)
            except queue.Empty:  # QEMU sends nothing: it may wait before the switchover
                with tokens.unbounded():
                    paused = qmp.cmd("query-migrate").get("status") == "pre-switchover"
                if paused:
                    if waiting:
                        sender.disk_pass(export.dirtied(), len(sender.stats.disk_passes))  # type: ignore[union-attr]
                        waiting = False
                    with tokens.unbounded():
                        qmp.cmd("migrate-continue", state="pre-switchover")
                continue
            if token is _END:
                break
            if isinstance(token, BaseException):
                raise token
            sender.feed(token)
            if waiting and hasattr(token, "number") and time.monotonic() - disk_pass > _DISK_PASS_SECONDS:
                # between passes over memory, what the guest wrote meanwhile: less for the last
                # pass, which the guest waits for (QEMU holds no lock for long before it pauses)
                sender.disk_pass(export.written(), len(sender.stats.disk_passes))  # type: ignore[union-attr]
                disk_pass = time.monotonic()
            if on_progress is not None and time.monotonic() - sampled > _PROGRESS_SECONDS:
                sampled = time.monotonic()
                with tokens.unbounded():
                    now = _migration_now(qmp)
                on_progress(sender.stats, now)
        sender.finish()
    finally:
        tokens.close()


def _prepare(qmp: Any, config: SendConfig, *, pause: bool) -> None:
    status = qmp.cmd("query-status")["status"]
    if status not in ("running", "paused"):
        raise ConfigError(f"the VM is {status}; a handoff moves a running or paused VM")
    if pause:  # the disk's last pass is sent while QEMU waits before the switchover
        _pause_before_switchover(qmp, True)
    if config.capabilities:
        qmp.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": name, "state": state} for name, state in config.capabilities.items()],
        )
    if config.parameters:
        qmp.cmd("migrate-set-parameters", **dict(config.parameters))


def _pause_before_switchover(qmp: Any, state: bool) -> None:
    qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": state}])


def _migrate_to_pipe(qmp: Any) -> int:
    """Start the migration into a pipe; the end to read it from."""
    read, write = os.pipe()
    try:
        qmp.send_fd_scm(write)
        qmp.cmd("getfd", fdname=_FD_NAME)
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    try:
        qmp.cmd("migrate", uri=f"fd:{_FD_NAME}")
    except BaseException:
        os.close(read)
        raise
    return read


def _migration_now(qmp: Any) -> dict[str, Any]:
    """QEMU's view of the migration under way: its dirty-page rate, what remains, its syncs of
    the dirty bitmap (passes over memory) and the downtime it expects."""
    info = qmp.cmd("query-migrate")
    ram = info.get("ram", {})
    return {
        "dirty_pages_rate": ram.get("dirty-pages-rate"),
        "remaining": ram.get("remaining"),
        "dirty_syncs": ram.get("dirty-sync-count"),
        "expected_downtime_ms": info.get("expected-downtime"),
    }


def _completed(qmp: Any, timeout: float) -> dict[str, Any]:
    """QEMU's account of the finished migration (``query-migrate``)."""
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.cmd("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise StorageError(f"QEMU's migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise VmdeltaError("QEMU did not finish its migration in time")
        time.sleep(0.02)
