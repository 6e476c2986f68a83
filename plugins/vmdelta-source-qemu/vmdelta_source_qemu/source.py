"""The ``qemu`` and ``qemu-ram`` sources.

``qemu`` reads migration streams (QEMU 7.2-10.x, ``migrate "exec:cat > FILE"`` or ``file:``),
mapped-ram files and x-ignore-shared streams together with their RAM file, and writes the same
kind of artifact back. ``qemu-ram`` reads a raw RAM image (the x-ignore-shared backing file, a
``pmemsave`` dump) as a one-block memory image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vmdelta_core.plugin import (
    ArtifactStream,
    ConfigError,
    FormatError,
    ImageKind,
    RebuiltImage,
    SideFile,
    Source,
    SourceImage,
    hole_extents,
    map_readonly,
    punch_zero_runs,
)
from vmdelta_source_qemu.blocks import MAIN_RAM, RamBlock, layout_of
from vmdelta_source_qemu.c_migration import PAGE_SIZE
from vmdelta_source_qemu.embedded import open_stream, rebuilt_image
from vmdelta_source_qemu.envelope import read_envelope
from vmdelta_source_qemu.imagefile import CHUNK_PAGES
from vmdelta_source_qemu.live import LiveToken, split_live_stream
from vmdelta_source_qemu.reader import ram_limit
from vmdelta_source_qemu.writer import stream_snapshot, write_snapshot

__all__ = ["QemuRamSource", "QemuSource"]


def _memory_only(name: str, kind: str) -> None:
    if kind != "memory":
        raise ConfigError(f"the {name} source reads memory images, not {kind} images")


class QemuSource(Source):
    """QEMU migration streams and mapped-ram files; options: ``tmpdir`` (where the image file
    goes), ``max_ram`` (the most RAM a block table may claim, in bytes; default 1 TiB); side file
    ``ram``: the RAM file of an x-ignore-shared stream (``--memory-ram``)."""

    name = "qemu"
    kinds = frozenset({"memory"})
    option_names = frozenset({"tmpdir", "max_ram"})
    side_files = (SideFile("ram", "the guest RAM file of a stream saved with x-ignore-shared"),)

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        _memory_only(self.name, kind)
        return open_stream(Path(path), options=options, kind=kind)

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        # the envelope comes from the overlay: untrusted until read_envelope has checked it
        checked = read_envelope(rebuilt.envelope, rebuilt.size)
        envelope, blocks, external = checked.envelope, checked.blocks, checked.external
        ram_output = rebuilt.side_outputs.get("ram")
        if external is not None and not ram_output:
            raise ConfigError(
                f"the stream was saved with x-ignore-shared: name where the rebuilt RAM file of block "
                f"{external.name!r} goes with --memory-ram"
            )
        with rebuilt_image(Path(rebuilt.path)) as (image, release):
            with open(output, "w+b") as out:
                write_snapshot(envelope, blocks, image, out, release)
            # the stream is complete before the RAM file replaces anything
            if external is not None:
                _write_ram_file(Path(ram_output), image, external, release)

    def stream_artifact(self, rebuilt: RebuiltImage, out: ArtifactStream) -> None:
        """The migration stream written front to back while the image is rebuilt (``apply`` to
        a pipe, QEMU's ``-incoming fd:0``); its end held back until everything is verified."""
        checked = read_envelope(rebuilt.envelope, rebuilt.size)
        if checked.external is not None:
            raise ConfigError("an x-ignore-shared snapshot keeps its RAM in a file: write the memory to a file")
        with rebuilt_image(Path(rebuilt.path)) as (image, release):
            stream_snapshot(checked.envelope, checked.blocks, image, out, release)

    def split_live(self, stream: BinaryIO, options: Mapping[str, Any] | None = None) -> Iterator[LiveToken]:
        """An outgoing live migration stream, read from ``stream`` as it arrives, split for a
        handoff's relay (:mod:`vmdelta_source_qemu.live`): verbatim bytes, pages of RAM at their
        image addresses, and the end of each pass."""
        return split_live_stream(stream, max_ram=ram_limit(options or {}))


def _write_ram_file(target: Path, image: np.ndarray, block: RamBlock, release: Callable[[int, int], None]) -> None:
    """The RAM file of an x-ignore-shared snapshot (``block`` of ``image``), sparse, written a
    chunk at a time, each released once written.

    ``target`` is the side output the core gave: it makes it atomic, and it may be an unnamed
    file reached through ``/proc/self/fd``, so it is opened by that path and nothing is created
    beside it.
    """
    step = CHUNK_PAGES * PAGE_SIZE
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, block.length)
        for first in range(0, block.length, step):
            at = block.offset + first
            stop = min(first + step, block.length)
            punch_zero_runs(fd, first, image[at : block.offset + stop], PAGE_SIZE)
            release(at, block.offset + stop)
    finally:
        os.close(fd)


class QemuRamSource(Source):
    """A raw RAM image, one block: options ``block`` (name, default ``pc.ram``) and
    ``guest_address`` (default 0)."""

    name = "qemu-ram"
    kinds = frozenset({"memory"})
    option_names = frozenset({"block", "guest_address"})

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        _memory_only(self.name, kind)
        data, closers = map_readonly(Path(path))
        if data.shape[0] % PAGE_SIZE:
            raise FormatError(
                f"raw RAM image {path} is {data.shape[0]} bytes, not a whole number of {PAGE_SIZE}-byte pages"
            )
        block = RamBlock(
            str(options.get("block", MAIN_RAM)), int(data.shape[0]), 0, int(options.get("guest_address", 0))
        )
        return SourceImage(
            kind=kind,
            data=data,
            holes=hole_extents(Path(path)),
            layout=layout_of([block], "raw", ignore_shared=False),
            closers=closers,
        )

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        rebuilt.move_to(output)
