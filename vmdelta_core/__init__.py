"""vmdelta: VM overlays between a base VM and a customized one, and their byte-exact synthesis."""

from __future__ import annotations

from vmdelta_core.components import (
    Codec,
    Encoder,
    Filter,
    FilterContext,
    FilterResult,
    ImageKind,
    RebuiltImage,
    Source,
    SourceImage,
)
from vmdelta_core.errors import (
    BaseMismatchError,
    ConfigError,
    FormatError,
    IntegrityError,
    PluginError,
    StorageError,
    VmdeltaError,
)
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.registry import Registry, default_registry

__all__ = [
    "BaseMismatchError",
    "Codec",
    "ConfigError",
    "Encoder",
    "Filter",
    "FilterContext",
    "FilterResult",
    "FormatError",
    "ImageKind",
    "IntegrityError",
    "PluginError",
    "RebuiltImage",
    "Registry",
    "Source",
    "SourceImage",
    "StorageError",
    "VmdeltaError",
    "default_registry",
    "hookimpl",
]
