"""The public surface for plugins: the one ``vmdelta_core`` module a plugin's code imports.

Everything a source, filter, encoder or codec needs from the core is named here, so the rest of
the core can change shape without breaking a plugin; an import-linter contract holds the plugins
of this repository to it. ``docs/writing-plugins.md`` documents each name.

Component contracts (the registry duck-types them; the classes are conveniences):

* :class:`Source`, :class:`SourceImage`, :class:`RebuiltImage`, :data:`ImageKind`: read an
  artifact into an image, and write the artifact of a rebuilt image; :class:`SideFile`, a file
  a source needs beside its artifact;
* :class:`Filter`, :class:`FilterContext`, :class:`FilterResult`: drop changed units;
* :class:`Encoder`: a unit as a payload against its base unit;
* :class:`Codec`: compress a frame of items.

Errors, the one tree the CLI turns into one line and an exit code: :class:`VmdeltaError` and its
kinds :class:`FormatError` (a damaged or foreign input), :class:`ConfigError` (a setting or input
that cannot work), :class:`PluginError`, :class:`StorageError` (the operating system refused a
read or write), :class:`IntegrityError` and :class:`BaseMismatchError`.

Hooks: :data:`hookimpl` marks a hook implementation; :data:`hookspec` declares the hooks of a
plugin that other plugins extend (added through ``vmdelta_addhooks``).

Files, for sources: :func:`open_regular` (a descriptor of a regular file, or a one-line
``ConfigError``), :func:`map_readonly` (a file as a read-only ``uint8`` array),
:func:`open_file_image` (a file whose bytes are the image, as a :class:`SourceImage`),
:func:`data_extents` and :func:`hole_extents` (where a sparse file holds data, and holes),
:func:`punch_zero_runs` (write an array into a file, leaving holes where whole units are zero).

Units: :func:`units_covered`, which units lie wholly inside sorted byte ranges (for filters).

Wire: :class:`Ref`, the ref ids of the item format (an encoder's ``wire_ref``).
"""

from __future__ import annotations

from vmdelta_core.components import (
    ArtifactStream,
    Codec,
    Encoder,
    Filter,
    FilterContext,
    FilterResult,
    ImageKind,
    RebuiltImage,
    SideFile,
    Source,
    SourceImage,
    release_pages,
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
from vmdelta_core.fileio import data_extents, hole_extents, map_readonly, open_file_image, open_regular, punch_zero_runs
from vmdelta_core.hookspecs import hookimpl, hookspec
from vmdelta_core.overlay.schema import Ref
from vmdelta_core.units import units_covered

__all__ = [
    "ArtifactStream",
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
    "Ref",
    "SideFile",
    "Source",
    "SourceImage",
    "StorageError",
    "VmdeltaError",
    "data_extents",
    "hole_extents",
    "hookimpl",
    "hookspec",
    "map_readonly",
    "open_file_image",
    "open_regular",
    "punch_zero_runs",
    "release_pages",
    "units_covered",
]
