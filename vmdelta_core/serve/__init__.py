"""A network transport for overlays: ``vmdelta serve`` on a cloudlet holding the bases,
``vmdelta send`` streaming an overlay to it (``schemas/transport-v1.md``).

Names are imported on first use, so that ``vmdelta send`` does not load the server's side (the
whole of apply) before its first byte leaves.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmdelta_core.serve.client import client_tls_context, send_overlay
    from vmdelta_core.serve.protocol import TransportError
    from vmdelta_core.serve.server import BaseCatalog, OverlayServer
    from vmdelta_core.serve.settings import QemuLaunch, ServeConfig, ServedBase, load_serve_config

_WHERE = {
    "BaseCatalog": "server",
    "OverlayServer": "server",
    "QemuLaunch": "settings",
    "ServeConfig": "settings",
    "ServedBase": "settings",
    "TransportError": "protocol",
    "client_tls_context": "client",
    "load_serve_config": "settings",
    "send_overlay": "client",
}
__all__ = [
    "BaseCatalog",
    "OverlayServer",
    "QemuLaunch",
    "ServeConfig",
    "ServedBase",
    "TransportError",
    "client_tls_context",
    "load_serve_config",
    "send_overlay",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"vmdelta_core.serve.{_WHERE[name]}"), name)
