"""Hook specifications of vmdelta.

Hooks *add hook specifications* and *register components*; each is called once per process
with keyword arguments, never per unit. Per-unit work goes through the batch methods of the registered components
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
# hook specifications: called once, when the plugin manager is built
# --------------------------------------------------------------------------------------------


@hookspec(historic=True)
def vmdelta_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add the hook specifications of a plugin that other plugins extend (the trim filter's
    trace parsers), as ``pytest_addhooks`` does.

    Historic: a plugin registered after the manager was built is called at registration.

    :param pluginmanager: call ``pluginmanager.add_hookspecs(module)`` with the module of specs.
    """


# --------------------------------------------------------------------------------------------
# registration: called once, when the registry is built
# --------------------------------------------------------------------------------------------


@hookspec
def vmdelta_register_sources(register: Callable[[Source], None], pluginmanager: pluggy.PluginManager) -> None:
    """Register artifact sources (QEMU streams, raw disks, ...).

    :param register: call it once per :class:`~vmdelta_core.components.Source` instance.
    :param pluginmanager: the manager the registry collects from (the process's, for
        ``default_registry()``), for a component that calls the hooks of plugins extending it;
        an implementation that does not need it leaves it out.
    """


@hookspec
def vmdelta_register_filters(register: Callable[[Filter], None], pluginmanager: pluggy.PluginManager) -> None:
    """Register filters that drop changed units the guest does not use.

    :param register: call it once per :class:`~vmdelta_core.components.Filter` instance.
    :param pluginmanager: the manager the registry collects from (the process's, for
        ``default_registry()``), for a component that calls the hooks of plugins extending it;
        an implementation that does not need it leaves it out.
    """


@hookspec
def vmdelta_register_encoders(register: Callable[[Encoder], None], pluginmanager: pluggy.PluginManager) -> None:
    """Register unit encoders (raw, xdelta3, XOR, ...).

    :param register: call it once per :class:`~vmdelta_core.components.Encoder` instance.
    :param pluginmanager: the manager the registry collects from (the process's, for
        ``default_registry()``), for a component that calls the hooks of plugins extending it;
        an implementation that does not need it leaves it out.
    """


@hookspec
def vmdelta_register_codecs(register: Callable[[Codec], None], pluginmanager: pluggy.PluginManager) -> None:
    """Register frame codecs (zstd, lzma, none).

    :param register: call it once per :class:`~vmdelta_core.components.Codec` instance.
    :param pluginmanager: the manager the registry collects from (the process's, for
        ``default_registry()``), for a component that calls the hooks of plugins extending it;
        an implementation that does not need it leaves it out.
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
