"""A network transport for overlays: ``vmdelta serve`` on a cloudlet holding the bases,
``vmdelta send`` streaming an overlay to it (``schemas/transport-v1.md``)."""

from __future__ import annotations

from vmdelta_core.serve.client import client_tls_context, send_overlay
from vmdelta_core.serve.protocol import TransportError
from vmdelta_core.serve.server import BaseCatalog, OverlayServer
from vmdelta_core.serve.settings import QemuLaunch, ServeConfig, ServedBase, load_serve_config

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
