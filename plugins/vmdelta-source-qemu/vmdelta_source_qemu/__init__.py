"""vmdelta source for QEMU memory snapshots.

Registers ``qemu`` (migration streams of QEMU 7.2-10.x, mapped-ram files, x-ignore-shared
streams with their RAM file) and ``qemu-ram`` (raw RAM images), and detects streams by their
QEVM magic. :mod:`vmdelta_source_qemu.embedded` is the public API for sources of formats that
wrap a QEMU stream in a file of their own (``open_stream``, ``write_stream``, ``is_stream``, ``ram_limit``).
:mod:`vmdelta_source_qemu.live` splits an outgoing live-migration stream, as it arrives, into
verbatim bytes and RAM pages (``split_live_stream``, ``split_live_runs``, ``stream_pieces``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vmdelta_core.plugin import Source, hookimpl
from vmdelta_source_qemu.embedded import STREAM_MAGIC, is_stream, open_stream, ram_limit, write_stream
from vmdelta_source_qemu.envelope import Envelope
from vmdelta_source_qemu.live import (
    BUFFER_SIZE,
    DEVICE_STATE_MAX,
    LiveToken,
    Page,
    PageRun,
    PassEnd,
    RunToken,
    Verbatim,
    split_live_runs,
    split_live_stream,
    stream_pieces,
)
from vmdelta_source_qemu.source import QemuRamSource, QemuSource

__all__ = [
    "BUFFER_SIZE",
    "DEVICE_STATE_MAX",
    "STREAM_MAGIC",
    "Envelope",
    "LiveToken",
    "Page",
    "PageRun",
    "PassEnd",
    "QemuRamSource",
    "QemuSource",
    "RunToken",
    "Verbatim",
    "is_stream",
    "open_stream",
    "ram_limit",
    "split_live_runs",
    "split_live_stream",
    "stream_pieces",
    "write_stream",
]

__version__ = "0.1.0"


@hookimpl
def vmdelta_register_sources(register: Callable[[Source], None]) -> None:
    register(QemuSource())
    register(QemuRamSource())


@hookimpl
def vmdelta_detect_source(path: Path, head: bytes, kind: str) -> str | None:
    if kind == "memory" and is_stream(head):
        return "qemu"
    return None
