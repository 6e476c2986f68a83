"""The ``file`` source: an artifact that is its image, byte for byte (a raw disk or RAM dump).

It is what the registry answers when no plugin's ``vmdelta_detect_source`` recognises an
artifact, so core works with no plugin installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vmdelta_core.components import ArtifactStream, ImageKind, RebuiltImage, Source, SourceImage
from vmdelta_core.fileio import open_file_image
from vmdelta_core.hookspecs import hookimpl

#: how much of the image each write hands on
_CHUNK = 1 << 20


class FileSource(Source):
    name = "file"
    kinds = frozenset({"memory", "disk"})

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        return open_file_image(path, kind)

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        rebuilt.move_to(output)

    def stream_artifact(self, rebuilt: RebuiltImage, out: ArtifactStream) -> None:
        """The image itself, written a chunk at a time as it becomes final; its last chunk is the
        tail, held back until everything is verified."""
        fd = os.open(rebuilt.path, os.O_RDONLY)
        try:
            at, tail = 0, b""
            while at < rebuilt.size:
                end = min(at + _CHUNK, rebuilt.size)
                out.wait_image(end)
                chunk = os.pread(fd, end - at, at)
                if len(chunk) != end - at:
                    raise OSError(f"{rebuilt.path}: short read at {at}")
                if tail:
                    out.write(tail)
                at, tail = end, chunk
            out.finish(tail)
        finally:
            os.close(fd)


@hookimpl
def vmdelta_register_sources(register: Callable[[Source], None]) -> None:
    register(FileSource())
