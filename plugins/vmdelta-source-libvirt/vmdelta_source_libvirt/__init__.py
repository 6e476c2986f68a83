"""vmdelta source for libvirt save images.

Registers ``libvirt``: the files ``virsh save`` and managed save write (libvirt's header, the
domain XML, then QEMU's migration stream, raw or compressed), read through the ``qemu`` source's
public API, and detects them by their ``LibvirtQemudSave`` magic (and the ``LibvirtQemudPart``
of an unfinished one, to refuse it with a clear message).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vmdelta_core.plugin import Source, hookimpl
from vmdelta_source_libvirt.c_libvirt import MAGIC, MAGIC_PARTIAL
from vmdelta_source_libvirt.header import SaveHeader, parse_prefix
from vmdelta_source_libvirt.source import LibvirtSource

__all__ = ["LibvirtSource", "SaveHeader", "parse_prefix"]

__version__ = "0.1.0"


@hookimpl
def vmdelta_register_sources(register: Callable[[Source], None]) -> None:
    register(LibvirtSource())


@hookimpl
def vmdelta_detect_source(path: Path, head: bytes, kind: str) -> str | None:
    if kind == "memory" and head[:16] in (MAGIC, MAGIC_PARTIAL):
        return "libvirt"
    return None
