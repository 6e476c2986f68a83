"""The ``file`` source: an artifact that is its image, byte for byte (a raw disk or RAM dump).

It is what the registry answers when no plugin's ``vmdelta_detect_source`` recognises an
artifact, so core works with no plugin installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vmdelta_core.components import ImageKind, RebuiltImage, Source, SourceImage
from vmdelta_core.fileio import open_file_image
from vmdelta_core.hookspecs import hookimpl


class FileSource(Source):
    name = "file"
    kinds = frozenset({"memory", "disk"})

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        return open_file_image(path, kind)

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        rebuilt.move_to(output)


@hookimpl
def vmdelta_register_sources(register: Callable[[Source], None]) -> None:
    register(FileSource())
