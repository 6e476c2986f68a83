"""vmdelta: VM overlays between a base VM and a customized one, and their byte-exact synthesis.

The library API: build a config, call :func:`create_overlay`, :func:`apply_overlay` or
:func:`inspect_overlay`, catch :class:`VmdeltaError`. It is imported on first use, so that a
plugin, which imports :mod:`vmdelta_core.plugin` and nothing else, does not load the pipeline.
A plugin's code takes its contracts from :mod:`vmdelta_core.plugin`; the component classes and
errors are here too for library users who pass their own components to a :class:`Registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from vmdelta_core.api import (
        ApplyConfig,
        ApplyImageSpec,
        CreateConfig,
        FilterSpec,
        ImageSpec,
        apply_overlay,
        create_overlay,
        inspect_overlay,
        load_pipeline,
    )

#: names of :mod:`vmdelta_core.api`, resolved by :func:`__getattr__` on first use
_API = frozenset(
    {
        "ApplyConfig",
        "ApplyImageSpec",
        "CreateConfig",
        "FilterSpec",
        "ImageSpec",
        "apply_overlay",
        "create_overlay",
        "inspect_overlay",
        "load_pipeline",
    }
)

__all__ = [
    "ApplyConfig",
    "ApplyImageSpec",
    "BaseMismatchError",
    "Codec",
    "ConfigError",
    "CreateConfig",
    "Encoder",
    "Filter",
    "FilterContext",
    "FilterResult",
    "FilterSpec",
    "FormatError",
    "ImageKind",
    "ImageSpec",
    "IntegrityError",
    "PluginError",
    "RebuiltImage",
    "Registry",
    "Source",
    "SourceImage",
    "StorageError",
    "VmdeltaError",
    "apply_overlay",
    "create_overlay",
    "default_registry",
    "hookimpl",
    "inspect_overlay",
    "load_pipeline",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        from vmdelta_core import api

        return getattr(api, name)
    raise AttributeError(f"module 'vmdelta_core' has no attribute {name!r}")
