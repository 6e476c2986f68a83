"""The plugin manager: builtins first, then every ``vmdelta`` entry point, minus the blocked ones."""

from __future__ import annotations

import functools
import os
from importlib import metadata
from types import ModuleType

import pluggy

from vmdelta_core import hookspecs
from vmdelta_core.errors import PluginError

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_VARIABLE",
    "ENTRY_POINT_GROUP",
    "blocked_plugins",
    "installed_plugins",
    "new_plugin_manager",
    "plugin_distribution",
]

ENTRY_POINT_GROUP = "vmdelta"
DISABLE_VARIABLE = "VMDELTA_DISABLE_PLUGINS"

#: plugin name -> module, registered through the same hooks as external plugins
BUILTIN_PLUGINS: dict[str, str] = {
    "core-file": "vmdelta_core.builtin.file",
    "core-raw": "vmdelta_core.builtin.raw",
    "core-codecs": "vmdelta_core.builtin.codecs",
}


def blocked_plugins(environ: dict[str, str] | None = None) -> frozenset[str]:
    """Plugin names listed in ``VMDELTA_DISABLE_PLUGINS`` (comma separated)."""
    value = (os.environ if environ is None else environ).get(DISABLE_VARIABLE, "")
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def installed_plugins() -> dict[str, str]:
    """Plugin name -> distribution of every plugin installed here, blocked or not: the builtins
    (``vmdelta-core``) and every ``vmdelta`` entry point. Reading entry points imports nothing."""
    found = dict.fromkeys(BUILTIN_PLUGINS, "vmdelta-core")
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, entry_point.dist.name if entry_point.dist else "(unknown)")
    return found


def new_plugin_manager(
    *, load_entry_points: bool = True, blocked: frozenset[str] | None = None
) -> pluggy.PluginManager:
    """A plugin manager with the builtins and, unless told otherwise, the installed plugins.

    ``vmdelta_addhooks`` is called before any plugin is registered; being historic, it reaches
    every plugin at its registration, so a plugin's specs are in place before the register hooks
    run and whatever order the entry points come in.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.hook.vmdelta_addhooks.call_historic(kwargs={"pluginmanager": pm})
    for name in blocked_plugins() if blocked is None else blocked:
        pm.set_blocked(name)
    for name, module_name in BUILTIN_PLUGINS.items():
        if pm.is_blocked(name):
            continue
        module = __import__(module_name, fromlist=["_"])
        pm.register(module, name=name)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except ValueError as exc:  # pluggy: a plugin name registered twice
            raise PluginError(f"two installed plugins share a name: {exc}") from None
        except ImportError as exc:
            raise PluginError(f"an installed vmdelta plugin failed to import: {exc}") from None
    return pm


def plugin_distribution(pm: pluggy.PluginManager, plugin: object) -> tuple[str, str]:
    """(distribution, version) that provides ``plugin``; core's for builtins and in-test plugins."""
    for candidate, dist in pm.list_plugin_distinfo():
        if candidate is plugin:
            return dist.metadata["name"], dist.version
    if isinstance(plugin, ModuleType) and plugin.__name__.startswith("vmdelta_core."):
        return "vmdelta-core", core_version()
    return "(not installed)", getattr(plugin, "__version__", "0")


@functools.cache
def core_version() -> str:
    try:
        return metadata.version("vmdelta-core")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"
