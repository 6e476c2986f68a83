"""vmdelta disk sources: ``raw`` (sparse-aware) and ``qcow2`` (v2/v3, compressed clusters,
backing chains), with thin qcow2 output backed by the base disk."""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path

from vmdelta_core.plugin import Source, hookimpl
from vmdelta_source_disk.c_qcow2 import MAGIC
from vmdelta_source_disk.qcow2_writer import WriteResult, write_qcow2
from vmdelta_source_disk.sources import Qcow2Source, RawSource, sparsify, write_thin_qcow2

__all__ = ["Qcow2Source", "RawSource", "WriteResult", "sparsify", "write_qcow2", "write_thin_qcow2"]
__version__ = "0.1.0"


@hookimpl
def vmdelta_register_sources(register: Callable[[Source], None]) -> None:
    register(RawSource())
    register(Qcow2Source())


@hookimpl(specname="vmdelta_detect_source")
def detect_qcow2(path: Path, head: bytes, kind: str) -> str | None:
    return "qcow2" if kind == "disk" and head[:4] == MAGIC else None


@hookimpl(specname="vmdelta_detect_source", wrapper=True)
def detect_raw_disk(path: Path, head: bytes, kind: str) -> Generator[None, str | None, str | None]:
    """A disk no plugin recognises is raw, rather than the core's generic ``file``.

    A wrapper, not a ``trylast`` implementation: pluggy calls the ``trylast`` implementation
    registered last after every earlier one, so the core's ``file`` fallback (registered first)
    would always answer before this one.
    """
    result = yield
    if kind == "disk" and result in (None, "file"):
        return "raw"
    return result
