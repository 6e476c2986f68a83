"""A typed facade over the plugin manager: the components that are available, by kind and name."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import attrs
import pluggy

from vmdelta_core.components import Codec, Encoder, Filter, Source
from vmdelta_core.errors import ConfigError, PluginError
from vmdelta_core.plugins import (
    DISABLE_VARIABLE,
    blocked_plugins,
    installed_plugins,
    new_plugin_manager,
    plugin_distribution,
)

__all__ = ["FALLBACK_SOURCE", "RAW_ENCODER", "ComponentInfo", "Registry", "default_registry", "registry_of"]

FALLBACK_SOURCE = "file"
#: the encoder every overlay can use, last in the default list
RAW_ENCODER = "raw"

ComponentKind = Literal["source", "filter", "encoder", "codec"]

_REQUIRED: dict[str, tuple[str, ...]] = {
    "source": ("name", "kinds", "open", "materialize"),
    "filter": ("name", "kinds", "select"),
    "encoder": ("name", "encode", "decode"),
    "codec": ("name", "compress", "decompress"),
}
_HOOKS: dict[str, str] = {
    "source": "vmdelta_register_sources",
    "filter": "vmdelta_register_filters",
    "encoder": "vmdelta_register_encoders",
    "codec": "vmdelta_register_codecs",
}


@attrs.frozen
class ComponentInfo:
    """One registered component and where it comes from."""

    kind: ComponentKind
    name: str
    component: Any = attrs.field(eq=False, repr=False)
    plugin: str
    distribution: str
    version: str


class Registry:
    """The components of one plugin manager, collected once through the register hooks."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._components: dict[tuple[str, str], ComponentInfo] = {}
        self._distributions: dict[int, tuple[str, str]] = {}  # by plugin: its metadata is read once
        for kind, hook_name in _HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                # one call per plugin, to know who registered what; with the arguments the
                # implementation names, as pluggy would pass them
                arguments = {"register": self._registrar(kind, impl.plugin, impl.plugin_name), "pluginmanager": pm}
                impl.function(**{name: arguments[name] for name in impl.argnames})

    def _registrar(self, kind: str, plugin: object, plugin_name: str) -> Callable[[Any], None]:
        def register(component: Any) -> None:
            missing = [attr for attr in _REQUIRED[kind] if not hasattr(component, attr)]
            if missing:
                raise PluginError(f"plugin {plugin_name!r} registered a {kind} without {', '.join(missing)}")
            name = component.name
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin_name!r} registered a {kind} with no name")
            if (kind, name) in self._components:
                first = self._components[kind, name]
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by plugin {first.plugin!r} ({first.distribution}) "
                    f"and by plugin {plugin_name!r}; uninstall one or block it with VMDELTA_DISABLE_PLUGINS"
                )
            if id(plugin) not in self._distributions:
                self._distributions[id(plugin)] = plugin_distribution(self.pm, plugin)
            distribution, version = self._distributions[id(plugin)]
            self._components[kind, name] = ComponentInfo(kind, name, component, plugin_name, distribution, version)  # type: ignore[arg-type]

        return register

    # ----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ComponentInfo]:
        return iter(sorted(self._components.values(), key=lambda info: (info.kind, info.name)))

    def __contains__(self, key: object) -> bool:
        """``(kind, name) in registry``: whether that component is installed and enabled."""
        return key in self._components

    def names(self, kind: ComponentKind) -> list[str]:
        return sorted(name for k, name in self._components if k == kind)

    def info(self, kind: ComponentKind, name: str) -> ComponentInfo:
        try:
            return self._components[kind, name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            disabled = ", ".join(sorted(self.disabled()))
            blocked = f"; {DISABLE_VARIABLE} disables plugin(s) {disabled}" if disabled else ""
            raise PluginError(f"no {kind} named {name!r} is installed (installed: {known}){blocked}") from None

    def disabled(self) -> dict[str, str]:
        """Plugin name -> distribution of each plugin installed here that ``VMDELTA_DISABLE_PLUGINS``
        keeps out of this registry."""
        return {name: dist for name, dist in installed_plugins().items() if self.pm.is_blocked(name)}

    def remedy(self, distribution: str, version: str) -> str:
        """What gets this machine a component of ``distribution`` (``version``) that the registry
        lacks: enabling the plugin when it is installed but disabled, else installing it."""
        wanted = _normalized(distribution)
        disabled = sorted(name for name, dist in self.disabled().items() if _normalized(dist) == wanted)
        if disabled:
            plugins = ", ".join(repr(name) for name in disabled)
            return f"{distribution} is installed but disabled: take {plugins} out of {DISABLE_VARIABLE}"
        try:
            installed = metadata.version(distribution)
        except (metadata.PackageNotFoundError, ValueError):
            return f"install it (pip install {distribution})"
        return (
            f"{distribution} {installed} is installed but does not provide it; "
            f"install the version the overlay was made with (pip install '{distribution}=={version}')"
        )

    def default_encoders(self) -> tuple[str, ...]:
        """The encoders ``create`` uses when the config names none: every installed encoder that
        declares a ``default_priority`` (lowest first, ties by name), then ``raw``."""
        ranked = sorted(
            (
                info
                for info in self._components.values()
                if info.kind == "encoder" and getattr(info.component, "default_priority", None) is not None
            ),
            key=lambda info: (info.component.default_priority, info.name),
        )
        return (*(info.name for info in ranked if info.name != RAW_ENCODER), RAW_ENCODER)

    def source(self, name: str) -> Source:
        return self.info("source", name).component

    def filter(self, name: str) -> Filter:
        return self.info("filter", name).component

    def encoder(self, name: str) -> Encoder:
        return self.info("encoder", name).component

    def codec(self, name: str) -> Codec:
        return self.info("codec", name).component

    def detect_source(self, path: Path, kind: str) -> str:
        """The source that reads ``path``, asked of every plugin's ``vmdelta_detect_source``."""
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        name = self.pm.hook.vmdelta_detect_source(path=path, head=head, kind=kind)
        if name is None:
            # nothing claimed it: the plain-file source reads anything, byte for byte
            name = FALLBACK_SOURCE
            if ("source", name) not in self._components:
                raise ConfigError(f"no installed source recognises {path} as a {kind} image; name one with --format")
        self.info("source", name)
        return str(name)


def _normalized(distribution: str) -> str:
    """A distribution name as packaging compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


_default: tuple[frozenset[str], Registry] | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The registry of the builtins and every installed, unblocked plugin.

    Built on first use and kept for the process, so the hooks run once; built again only when
    ``VMDELTA_DISABLE_PLUGINS`` names other plugins than it was built with.
    """
    global _default
    blocked = blocked_plugins()
    with _default_lock:
        if _default is None or _default[0] != blocked:
            _default = (blocked, Registry(new_plugin_manager(blocked=blocked)))
        return _default[1]


_only: dict[frozenset[str], Registry] = {}


def registry_of(distributions: Iterable[str]) -> Registry:
    """The builtins and the installed, unblocked plugins of ``distributions`` only: what an
    overlay's components name, so that ``apply`` imports the plugins it uses and not every one
    installed. Kept for the process like :func:`default_registry`, one per set of plugins."""
    wanted = {_normalized(d) for d in distributions}
    others = {
        name for name, dist in installed_plugins().items() if dist != "vmdelta-core" and _normalized(dist) not in wanted
    }
    blocked = blocked_plugins() | frozenset(others)
    with _default_lock:
        if blocked not in _only:
            _only[blocked] = Registry(new_plugin_manager(blocked=blocked))
        return _only[blocked]
