"""Hook specifications of vmdelta.

Hooks *register components*; each is called once per process with keyword arguments, never per
unit. Per-unit work goes through the batch methods of the registered components
(:mod:`vmdelta_core.components`). ``docs/writing-plugins.md`` lists the same hooks; a test keeps
the two in step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from vmdelta_core.components import Codec, Encoder, Filter, Source

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("vmdelta")
hookimpl = pluggy.HookimplMarker("vmdelta")

# --------------------------------------------------------------------------------------------
# registration: called once, when the registry is built
# --------------------------------------------------------------------------------------------


@hookspec
def vmdelta_register_sources(register: Callable[[Source], None]) -> None:
    """Register artifact sources (QEMU streams, raw disks, ...).

    :param register: call it once per :class:`~vmdelta_core.components.Source` instance.
    """


@hookspec
def vmdelta_register_filters(register: Callable[[Filter], None]) -> None:
    """Register filters that drop changed units the guest does not use.

    :param register: call it once per :class:`~vmdelta_core.components.Filter` instance.
    """


@hookspec
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    """Register unit encoders (raw, xdelta3, XOR, ...).

    :param register: call it once per :class:`~vmdelta_core.components.Encoder` instance.
    """


@hookspec
def vmdelta_register_codecs(register: Callable[[Codec], None]) -> None:
    """Register frame codecs (zstd, lzma, none).

    :param register: call it once per :class:`~vmdelta_core.components.Codec` instance.
    """


# --------------------------------------------------------------------------------------------
# detection: called once per artifact the user did not give a --format for
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def vmdelta_detect_source(path: Path, head: bytes, kind: str) -> str | None:
    """Name the source that reads ``path``, or return ``None`` to let the next plugin look.

    :param path: the artifact.
    :param head: its first 4096 bytes (fewer for a shorter file).
    :param kind: ``"memory"`` or ``"disk"``, the kind of image the user says it holds.
    :returns: a registered source name, or ``None``.
    """
