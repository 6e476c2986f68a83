"""A typed facade over the plugin manager: the components that are available, by kind and name."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import attrs
import pluggy

from vmdelta_core.components import Codec, Encoder, Filter, Source
from vmdelta_core.errors import ConfigError, PluginError
from vmdelta_core.plugins import blocked_plugins, new_plugin_manager, plugin_distribution

__all__ = ["FALLBACK_SOURCE", "ComponentInfo", "Registry", "default_registry"]

FALLBACK_SOURCE = "file"

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
            distribution, version = plugin_distribution(self.pm, plugin)
            self._components[kind, name] = ComponentInfo(kind, name, component, plugin_name, distribution, version)  # type: ignore[arg-type]

        return register

    # ----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ComponentInfo]:
        return iter(sorted(self._components.values(), key=lambda info: (info.kind, info.name)))

    def names(self, kind: ComponentKind) -> list[str]:
        return sorted(name for k, name in self._components if k == kind)

    def info(self, kind: ComponentKind, name: str) -> ComponentInfo:
        try:
            return self._components[kind, name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"no {kind} named {name!r} is installed (installed: {known})") from None

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
