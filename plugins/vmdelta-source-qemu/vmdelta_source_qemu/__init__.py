"""vmdelta source for QEMU memory snapshots.

Registers ``qemu`` (migration streams of QEMU 7.2-10.x, mapped-ram files, x-ignore-shared
streams with their RAM file) and ``qemu-ram`` (raw RAM images), and detects streams by their
QEVM magic. :mod:`vmdelta_source_qemu.embedded` is the public API for sources of formats that
wrap a QEMU stream in a file of their own (``open_stream``, ``write_stream``, ``is_stream``, ``ram_limit``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vmdelta_core.plugin import Source, hookimpl
from vmdelta_source_qemu.embedded import STREAM_MAGIC, is_stream, open_stream, ram_limit, write_stream
from vmdelta_source_qemu.envelope import Envelope
from vmdelta_source_qemu.source import QemuRamSource, QemuSource

__all__ = [
    "STREAM_MAGIC",
    "Envelope",
    "QemuRamSource",
    "QemuSource",
    "is_stream",
    "open_stream",
    "ram_limit",
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
