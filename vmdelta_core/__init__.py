"""vmdelta: VM overlays between a base VM and a customized one, and their byte-exact synthesis.

The library API: build a config, call :func:`create_overlay`, :func:`apply_overlay` or
:func:`inspect_overlay`, catch :class:`VmdeltaError`. Every name but the errors is imported on
first use, so that a plugin, which imports :mod:`vmdelta_core.plugin` and nothing else, does not
load the pipeline, and ``vmdelta --help`` does not load numpy.
A plugin's code takes its contracts from :mod:`vmdelta_core.plugin`; the component classes and
errors are here too for library users who pass their own components to a :class:`Registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmdelta_core.errors import (
    BaseMismatchError,
    ConfigError,
    FormatError,
    IntegrityError,
    PluginError,
    StorageError,
    VmdeltaError,
)

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
    from vmdelta_core.hookspecs import hookimpl
    from vmdelta_core.registry import Registry, default_registry

#: where each name is resolved by :func:`__getattr__` on first use: importing the package costs
#: nothing of numpy, pluggy or the pipeline until one of them is asked for
_LAZY = {
    **dict.fromkeys(
        (
            "ApplyConfig",
            "ApplyImageSpec",
            "CreateConfig",
            "FilterSpec",
            "ImageSpec",
            "apply_overlay",
            "create_overlay",
            "inspect_overlay",
            "load_pipeline",
        ),
        "vmdelta_core.api",
    ),
    **dict.fromkeys(
        (
            "Codec",
            "Encoder",
            "Filter",
            "FilterContext",
            "FilterResult",
            "ImageKind",
            "RebuiltImage",
            "Source",
            "SourceImage",
        ),
        "vmdelta_core.components",
    ),
    "hookimpl": "vmdelta_core.hookspecs",
    "Registry": "vmdelta_core.registry",
    "default_registry": "vmdelta_core.registry",
}

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
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmdelta_core' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value
