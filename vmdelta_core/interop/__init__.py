"""Formats of other systems that vmdelta reads and writes.

:mod:`.elijah` is the overlay package of the original VM-synthesis system (a zip of a msgpack
``overlay-meta`` and LZMA-compressed DeltaItem streams); :mod:`.elijah_export` writes one from a
vmdelta overlay and :mod:`.elijah_import` turns one into a vmdelta overlay. ``docs/elijah.md``
describes the mapping.
"""

from __future__ import annotations

from vmdelta_core.interop.elijah_export import ExportReport, export_elijah
from vmdelta_core.interop.elijah_import import ImportReport, import_elijah

__all__ = ["ExportReport", "ImportReport", "export_elijah", "import_elijah"]
