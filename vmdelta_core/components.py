"""What a plugin provides: sources, filters, encoders and frame codecs.

Components are plain classes with *batch* methods; the core calls them once per image or once per
batch of units, never once per unit from a Python loop of its own. A plugin hands instances to the
``register`` callback of the matching ``vmdelta_register_*`` hook.

The base classes here are conveniences, not requirements: the registry checks for the attributes
and methods it needs (duck typing), so a plugin may implement them on any class.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import attrs
import numpy as np

from vmdelta_core.errors import ConfigError

__all__ = [
    "ArtifactStream",
    "Codec",
    "Encoder",
    "Filter",
    "FilterContext",
    "FilterResult",
    "ImageKind",
    "RebuiltImage",
    "SideFile",
    "Source",
    "SourceImage",
    "release_pages",
]

ImageKind = Literal["memory", "disk"]


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def release_pages(mapping: mmap.mmap | None, start: int, stop: int) -> None:
    """Drop the pages of ``mapping[start:stop]``, a read-only file map (``map_readonly``), from
    this process's memory; they fault back in from the page cache when read again. For maps a
    source holds without an image of its own (the stream it parses, the rebuilt file it reads).
    A closed map holds nothing to release."""
    if mapping is None or stop <= start:
        return
    page = mmap.PAGESIZE
    lo = start - start % page
    with contextlib.suppress(ValueError, OSError):
        hi = min(-(-stop // page) * page, len(mapping))
        if hi > lo:
            mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


@attrs.define(eq=False)
class SourceImage:
    """An artifact opened by a source: the image to diff and what is needed to rebuild the artifact.

    ``data`` is a read-only ``uint8`` array of exactly ``size`` bytes, usually a view of an mmap,
    so reading it costs page faults, not copies. ``holes`` lists byte ranges known to be zero
    (``(n, 2)`` int64 array of start, length), which change detection skips when both images
    have them. ``hints``, when not ``None``, is a sorted array of unit indices outside which the
    modified image is known to equal its base (a qcow2 overlay's allocated clusters, say).
    ``envelope`` holds the bytes of the artifact that are not in the image (device state, block
    table); it is stored in the overlay, compressed against the base's envelope. ``layout`` is
    JSON-able geometry (a RAM block table) that goes into the overlay metadata as it is.
    """

    kind: ImageKind
    data: np.ndarray
    holes: np.ndarray = attrs.field(factory=lambda: np.zeros((0, 2), dtype=np.int64))
    hints: np.ndarray | None = None
    #: the file the hints are relative to: they are used only when it is the base being compared
    hints_base: Path | None = None
    envelope: bytes = b""
    layout: Mapping[str, Any] = attrs.field(factory=dict)
    #: True when materialize() reproduces the artifact byte for byte from image + envelope.
    exact_artifact: bool = True
    #: the file ``data`` is a read-only map of, byte for byte, when it is one: the core then copies
    #: it with the kernel's help and drops the pages it has finished reading from its memory
    file: Path | None = None
    #: the read-only file mapping ``data`` views from byte 0, if any (see :meth:`release`)
    mapping: Any = None
    #: what :meth:`close` closes, last first: the maps and files ``data`` views
    closers: list[Any] = attrs.field(factory=list)

    @property
    def size(self) -> int:
        return int(self.data.shape[0])

    def padded(self, start: int, length: int) -> bytes:
        """``length`` bytes of the image from ``start``, zero-padded past its end (a unit of a
        grown image read from its base, say)."""
        got = self.data[start : min(start + length, self.size)].tobytes() if start < self.size else b""
        return got.ljust(length, b"\0")

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of ``data[start:stop]`` from this process's memory.

        Only for file-backed maps (``mapping``), whose pages fault back in from the page cache
        when read again; otherwise a no-op. Keeps peak memory bounded by what is being worked on
        rather than by the image size.
        """
        release_pages(self.mapping, start, min(stop, self.size))

    def close(self) -> None:
        """Release mmaps and files; the arrays must not be used afterwards."""
        while self.closers:
            closer = self.closers.pop()
            # numpy views of an mmap may still be alive elsewhere; the mmap goes when they do
            with contextlib.suppress(BufferError):
                closer.close()

    def __enter__(self) -> SourceImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define(eq=False)
class RebuiltImage:
    """The rebuilt image handed to :meth:`Source.materialize` at apply time.

    ``path`` is a raw file of ``size`` bytes (sparse where zero) in the output's folder; it may
    have no name of its own (an unnamed temporary reached through ``/proc/self/fd``), so open it
    by this path but never rename it: a source whose artifact *is* the raw image calls
    :meth:`move_to` instead. ``changed`` holds the indices of the units that differ from the base
    image (the units the overlay wrote or zeroed), ``base`` the opened base artifact and
    ``base_path`` its file, for outputs that refer to it (a qcow2 backed by the base).
    """

    path: Path
    size: int
    unit_size: int
    envelope: bytes
    layout: Mapping[str, Any]
    changed: np.ndarray
    base: SourceImage
    base_path: Path
    options: Mapping[str, Any] = attrs.field(factory=dict)
    #: where each side file of the rebuilt artifact goes, by :class:`SideFile` name: unnamed
    #: files like ``output``, written by opening the path
    side_outputs: Mapping[str, Path] = attrs.field(factory=dict)
    #: set by ``apply``: makes the rebuilt file the output in place of what ``materialize`` got
    adopt: Callable[[Path], None] | None = attrs.field(default=None, repr=False)

    def move_to(self, output: Path) -> None:
        """Make the rebuilt raw image the artifact at ``output`` without copying a byte (for a
        source whose artifact is the raw image); ``path`` must not be used afterwards."""
        if self.adopt is not None:
            self.adopt(Path(output))
        else:
            os.replace(self.path, output)


@attrs.frozen
class SideFile:
    """A file an image needs beside its artifact, at create and at apply (QEMU's x-ignore-shared
    RAM file).

    It is optional: a source that needs it for some artifact says so when it opens one. The user
    names one per artifact: ``base_sides`` and ``modified_sides`` of a pipeline image,
    ``base_sides`` and ``output_sides`` at apply, ``--memory-side NAME BASE OTHER`` on the command
    line. The core checks it like the artifact (it exists, is a regular file, is never an output),
    hands its path to :meth:`Source.open` as ``options[name]`` and to :meth:`Source.materialize`
    as ``rebuilt.side_outputs[name]``, an unnamed output put in place with the others.
    """

    name: str
    #: one line for ``vmdelta plugins`` and messages
    description: str


class ArtifactStream(Protocol):
    """Where a source writes its artifact while the image is still being rebuilt (``apply`` with
    the output ``-``: a QEMU ``-incoming`` reading the memory stream as the overlay arrives).

    The source writes the artifact front to back, waiting before each piece of the image it
    reads; its last bytes (those that let the consumer complete, a QEMU stream's device state
    and end) go to :meth:`finish`, which the core writes only once every image is verified and
    every other output is in place. A failure anywhere makes these methods raise, and the
    consumer never gets the end.
    """

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        """Write the next bytes of the artifact."""
        ...

    def wait_image(self, end: int) -> None:
        """Block until bytes ``[0, end)`` of the rebuilt image (``rebuilt.path``) are final."""
        ...

    def finish(self, tail: bytes) -> None:
        """Hand over the artifact's last bytes; returns once they are written, or raises."""
        ...


class Source:
    """Reads an artifact format into an image, and writes the same format back.

    A source may also define ``stream_artifact(rebuilt, out: ArtifactStream)``: the artifact
    written front to back while the image is rebuilt, for ``apply`` to a pipe. It may refuse
    (raise ``ConfigError``) an artifact that cannot be written in one pass.

    :cvar name: unique component name (``--format NAME``).
    :cvar kinds: the image kinds it can read (``{"memory"}``, ``{"disk"}`` or both).
    :cvar output_formats: the output kinds ``materialize`` can write besides the input format, as
        accepted by ``apply --disk-format`` (for example ``("qcow2",)``).
    :cvar option_names: the ``base_options`` / ``modified_options`` keys ``open`` understands;
        the core refuses any other key before opening anything.
    :cvar side_files: the files beside an artifact it reads and writes (:class:`SideFile`); the
        core refuses any other side file by name.
    """

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = frozenset({"memory", "disk"})
    output_formats: ClassVar[tuple[str, ...]] = ()
    option_names: ClassVar[frozenset[str]] = frozenset()
    side_files: ClassVar[tuple[SideFile, ...]] = ()

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        """Open ``path`` read-only and present its image.

        :param path: the artifact.
        :param kind: which kind of image the user says it holds.
        :param options: the image's ``base_options`` or ``modified_options``, and the path of each
            side file given, under its name.
        :raises FormatError: the file is not in this format or is damaged.
        """
        raise NotImplementedError

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        """Write the artifact for ``rebuilt`` at ``output``.

        ``output`` is an empty temporary file the core puts in place once every image of the
        overlay has been written and checked; like ``rebuilt.path`` it may have no name of its
        own, so write it by opening this path (never rename onto it or create files beside it).
        The side files in ``rebuilt.side_outputs`` are such files too.

        :param rebuilt: the rebuilt image, its envelope and layout.
        :param output: where to write.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------


@attrs.frozen
class FilterContext:
    """What a filter may look at when deciding which changed units to drop."""

    image_name: str
    kind: ImageKind
    unit_size: int
    base: SourceImage
    modified: SourceImage
    #: the input the user named with ``--filter NAME:INPUT`` (a trace log, a PFN list), if any
    input: Path | None
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class FilterResult:
    """Which candidates to drop: a boolean mask over the candidate array, and why."""

    drop: np.ndarray
    reason: str
    #: anything worth recording in the overlay header (counts, what was skipped and why)
    details: Mapping[str, Any] = attrs.field(factory=dict)


class Filter:
    """Drops changed units that the guest treats as free space.

    :cvar name: unique component name (``--filter NAME``).
    :cvar kinds: image kinds it applies to.
    :cvar needs_input: whether ``--filter NAME:INPUT`` must name an input file.
    :cvar option_names: the ``--filter-option NAME.KEY=VALUE`` keys the filter understands; the
        core refuses any other key before work starts (the filter still checks the values).
    """

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = frozenset({"memory", "disk"})
    needs_input: ClassVar[bool] = False
    option_names: ClassVar[frozenset[str]] = frozenset()

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        """Decide, in one call per image, which candidate units to drop.

        :param context: the images and the filter's input.
        :param candidates: sorted ``int64`` unit indices of changed units.
        :returns: a mask of the same length as ``candidates``.
        :raises ConfigError: the input does not match the image (a log of another disk...).
        """
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------


class Encoder:
    """Turns (base unit at the same offset, modified unit) into a payload, or declines.

    :cvar name: unique component name (``--encoder NAME``).
    :cvar wire_ref: the classic DeltaItem ref id (high nibble, ``0x1``..``0xF``) this encoding
        has always had, or ``None`` to receive a free id per overlay.
    :cvar default_priority: when set, the encoder is part of the default encoder list (lowest
        first) that ``create`` uses when the config names none; leave it ``None`` unless the
        encoder measurably makes overlays smaller on real images.
    """

    name: ClassVar[str]
    wire_ref: ClassVar[int | None] = None
    default_priority: ClassVar[int | None] = None

    def configure(self, options: Mapping[str, Any]) -> Encoder:
        """A copy of this encoder with ``options`` (``--encoder-option NAME.KEY=VALUE``) applied.

        :raises ConfigError: an option it does not take, or a value out of range.
        """
        raise ConfigError(f"encoder {self.name!r} takes no options")

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        """Encode a batch; ``None`` declines a unit (the policy then tries the next encoder).

        ``bases[i]`` is the base image's bytes at the unit's offset, zero-padded to
        ``len(targets[i])``. Implementations should release the GIL in their C calls: the core
        runs batches on a thread pool.
        """
        raise NotImplementedError

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        """Decode a batch; each result must be exactly ``lengths[i]`` bytes.

        Payloads come from untrusted overlays: a damaged payload raises :class:`FormatError`,
        and no payload may make the decoder allocate more than a small multiple of the length.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# frame codecs
# --------------------------------------------------------------------------------------------


class Codec:
    """Compresses one frame of items.

    :cvar name: unique component name (``--codec NAME``).
    :cvar default_level: level used when the config names none.
    :cvar level_range: the lowest and highest level ``compress`` accepts, both included, or
        ``None`` for a codec without levels; the core refuses any other level (``--level``)
        before work starts, so ``compress`` only ever sees ``None`` or a level in range.
    """

    name: ClassVar[str]
    default_level: ClassVar[int | None] = None
    level_range: ClassVar[tuple[int, int] | None] = None

    def compress(self, data: bytes, level: int | None) -> bytes:
        raise NotImplementedError

    def decompress(self, data: bytes, size: int) -> bytes:
        """Decompress a frame known to be ``size`` bytes; never produce more.

        :raises FormatError: the data are damaged or do not decompress to exactly ``size`` bytes.
        """
        raise NotImplementedError
