"""``vmdelta export --elijah``: a vmdelta overlay as an overlay package of the original system.

The package describes one VM: a memory snapshot and one raw disk, each a plain run of bytes cut
into 4096-byte chunks. An overlay fits when it has one memory image and one disk image that are
their files byte for byte (the ``file`` and ``raw`` sources: no envelope, the artifact's digest
the image's) and 4096-byte units; anything else is refused with the reason. Its items keep their records,
the addresses of self references rewritten as the original numbered items; items of an encoder
the original lacks (or whose payload it would read differently) are decoded against their base
and stored RAW, which needs that base.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import hashlib
import lzma
import os
import time
import zipfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import attrs
import numpy as np

from vmdelta_core.components import Encoder, SourceImage
from vmdelta_core.errors import BaseMismatchError, ConfigError, FormatError, PluginError
from vmdelta_core.fileio import check_input, open_file_image
from vmdelta_core.interop.elijah import (
    CHUNK,
    META_NAME,
    ZIP_COMMENT,
    BlobInfo,
    PackageMeta,
    blob_name,
    self_index,
)
from vmdelta_core.limits import ELIJAH_BLOB_SIZE, ELIJAH_LEVEL
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.digest import digest_kind
from vmdelta_core.overlay.items import ItemColumns, item_sizes, pack_items, split_address
from vmdelta_core.overlay.metadata import ImageRecord, OverlayMetadata
from vmdelta_core.overlay.schema import ITEM_TYPES, Ref
from vmdelta_core.records import NullProgress, Progress
from vmdelta_core.registry import Registry, default_registry

__all__ = ["DEFAULT_BLOB_SIZE", "DEFAULT_LEVEL", "ExportReport", "export_elijah"]

DEFAULT_LEVEL = ELIJAH_LEVEL
DEFAULT_BLOB_SIZE = ELIJAH_BLOB_SIZE
#: refs whose records the original reads exactly as vmdelta writes them
_KEPT = frozenset({Ref.RAW, Ref.ZEROS, Ref.BASE_MEM, Ref.BASE_DISK, Ref.SELF})
#: encoders whose payloads are the original's encodings, against the same base unit: VCDIFF and
#: BSDIFF40 (vmdelta's XOR stores runs, not the whole XOR, so it is converted)
_SAME_ENCODING = {Ref.XDELTA: "xdelta3", Ref.BSDIFF: "bsdiff"}
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the same package for the same overlay


@attrs.frozen
class ExportReport:
    """What :func:`export_elijah` wrote."""

    output: Path
    size: int
    seconds: float
    blobs: int
    #: items per image
    items: Mapping[str, int]
    #: units stored RAW per encoder the package cannot express
    converted: Mapping[str, int]


def export_elijah(
    overlay: Path,
    output: Path,
    *,
    base_disk: Path,
    base_memory: Path | None = None,
    level: int = DEFAULT_LEVEL,
    blob_size: int = DEFAULT_BLOB_SIZE,
    threads: int | None = None,
    registry: Registry | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Write ``overlay`` as the package ``output`` (appears only once complete).

    :param base_disk: the base disk: the package names its base VM by this file's SHA-256, and it
        is checked against the overlay's record of it first.
    :param base_memory: the base memory snapshot, needed only when memory items must be decoded
        (an encoder the package cannot express).
    :raises ConfigError: the overlay is not one the package can describe, or a base it needs is
        missing; nothing is written.
    """
    started = time.monotonic()
    registry = registry or default_registry()
    progress = progress or NullProgress()
    overlay, output = Path(overlay), Path(output)
    if not 0 <= level <= 9:
        raise ConfigError(f"--level {level}: xz presets go from 0 to 9")
    if blob_size < CHUNK:
        raise ConfigError(f"a blob holds at least one chunk ({CHUNK} bytes), not {blob_size}")
    given = {"memory": base_memory, "disk": Path(base_disk)}
    check_input(overlay, "overlay")
    for kind, path in given.items():
        if path is not None:
            check_input(path, f"base {kind}")
    with contextlib.ExitStack() as stack:
        outputs = stack.enter_context(OutputSet([overlay, *(p for p in given.values() if p is not None)]))
        pending = outputs.add(output)
        reader = stack.enter_context(OverlayReader(overlay))
        reader.verify(progress.start("verify overlay", reader.size))
        meta = OverlayMetadata.from_json(reader.metadata, reader.frames)
        images = _vm_images(meta)
        sha256 = _check_base(given["disk"], images["disk"][1], progress, want_sha256=True)
        plan = _Conversion(meta, images)
        bases: dict[str, SourceImage] = {}
        for kind in plan.needs_base:
            path = given[kind]
            if path is None:
                raise ConfigError(
                    f"{plan.needs_base[kind]}: converting them to RAW decodes them against the base {kind}: "
                    f"give --base-{kind}"
                )
            if kind != "disk":
                _check_base(path, images[kind][1], progress)
            bases[kind] = stack.enter_context(open_file_image(path, kind))
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1))
        try:
            with open(pending.path, "wb") as f:
                package = _PackageWriter(f, level, blob_size, pool)
                items = _write_items(reader, meta, images, plan, bases, registry, package, progress)
                size = package.finish(sha256, images["disk"][1].size, images["memory"][1].size)
        except OSError as exc:
            raise outputs.explain(exc, output) from None
        outputs.commit()
    return ExportReport(
        output=output,
        size=size,
        seconds=time.monotonic() - started,
        blobs=package.blob_count,
        items=items,
        converted=dict(plan.converted),
    )


def _vm_images(meta: OverlayMetadata) -> dict[str, tuple[int, ImageRecord]]:
    """The memory image and the disk image, by kind, with their numbers: refused unless the
    overlay is one memory snapshot and one disk, of 4096-byte units, read byte for byte."""
    if meta.unit_size != CHUNK:
        raise ConfigError(
            f"the overlay was made with {meta.unit_size}-byte units; the package's chunks are {CHUNK} bytes "
            f"(create it with --unit-size {CHUNK})"
        )
    found: dict[str, list[tuple[int, ImageRecord]]] = {"memory": [], "disk": []}
    for number, image in enumerate(meta.images):
        found[image.kind].append((number, image))
    if len(found["disk"]) > 1:
        names = ", ".join(image.name for _, image in found["disk"])
        raise ConfigError(f"the package holds one disk; this overlay has {len(found['disk'])} ({names})")
    for kind, listed in found.items():
        if not listed:
            raise ConfigError(f"the package describes a VM by its memory and its disk; this overlay has no {kind}")
        _check_plain(listed[0][1])
    return {kind: listed[0] for kind, listed in found.items()}


def _check_plain(image: ImageRecord) -> None:
    """Refuse an image that is not its artifact's bytes: the package's offsets are file offsets.

    An envelope (a QEMU stream's device state) has no place in the package; an artifact whose
    recorded digest is not the image's, or that has none though nothing was dropped (a qcow2), is
    another file than its image. When units were dropped the artifact has no digest: the base,
    read by the same source, is checked as plain bytes instead (:func:`_check_base`).
    """
    what = None
    if image.envelope is not None:
        what = "which keeps an envelope (device state) beside the image"
    elif image.artifact_digest != image.digest and (
        image.artifact_digest is not None or not any(f.dropped for f in image.filters)
    ):
        # no digest though nothing was dropped: the source does not rebuild the file itself
        what = "whose image is not its file byte for byte"
    if what is not None:
        raise ConfigError(
            f"image {image.name} is read by the {image.source!r} source, {what}; the package holds each image "
            f"as a plain file: create the overlay from raw files with --{image.kind}-format file"
        )


def _check_base(path: Path, image: ImageRecord, progress: Progress, *, want_sha256: bool = False) -> str:
    """Check ``path`` against the base ``image`` records (size, then fingerprint, in one read);
    with ``want_sha256`` also its SHA-256, the base VM's name in the package."""
    size = os.path.getsize(path)
    if size != image.base.size:
        raise BaseMismatchError(
            f"{path} is not the base of {image.name} ({size} bytes; the overlay's base {image.base.name} "
            f"has {image.base.size})"
        )
    digest = digest_kind(image.base.fingerprint)()
    sha = hashlib.sha256()
    advance = progress.start(f"check base {image.kind}", size)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            if want_sha256:
                sha.update(chunk)
            advance(len(chunk))
    if digest.hexdigest() != image.base.fingerprint:
        how = (
            ""
            if image.base_source == "file"
            else f", or the {image.base_source!r} source does not read it as its bytes"
        )
        raise BaseMismatchError(
            f"{path} is not the base of {image.name} (fingerprint differs from {image.base.name}{how})"
        )
    return sha.hexdigest()


class _Conversion:
    """Which refs keep their records, which are decoded to RAW (by which encoder), and the bases
    that decoding needs (by kind, with the reason)."""

    def __init__(self, meta: OverlayMetadata, images: dict[str, tuple[int, ImageRecord]]) -> None:
        self.kept = set(_KEPT)
        self.decoders: dict[int, Encoder] = {}
        self.needs_base: dict[str, str] = {}
        self.converted: collections.Counter[str] = collections.Counter()
        names = {ref: component.name for ref, component in meta.encoders().items()}
        for ref, name in names.items():
            if _SAME_ENCODING.get(ref) == name:  # type: ignore[call-overload]
                self.kept.add(ref)
        self.names = names
        for kind, (_, image) in images.items():
            used = {name for name, use in image.statistics.encoders.items() if use.units}
            converted = sorted(name for ref, name in names.items() if name in used and ref not in self.kept)
            if converted:
                self.needs_base[kind] = (
                    f"the {kind} items of encoder(s) {', '.join(converted)} have no record in the package"
                )
            elif image.size > image.base.size and any(
                name in used for ref, name in names.items() if ref in self.kept and ref != Ref.RAW
            ):
                # past the base's end vmdelta diffs against zeros, the original against nothing
                self.needs_base[kind] = f"{kind} items past the end of the base decode against zeros"

    def decoder(self, ref: int, registry: Registry) -> Encoder:
        if ref not in self.decoders:
            name = self.names.get(ref)
            if name is None:
                raise FormatError(f"items use ref {ref:#x}, which the overlay's metadata does not list")
            try:
                self.decoders[ref] = registry.encoder(name)
            except PluginError as exc:
                raise PluginError(f"{exc}; converting its items to RAW needs it") from None
        return self.decoders[ref]


def _write_items(
    reader: OverlayReader,
    meta: OverlayMetadata,
    images: dict[str, tuple[int, ImageRecord]],
    plan: _Conversion,
    bases: dict[str, SourceImage],
    registry: Registry,
    package: _PackageWriter,
    progress: Progress,
) -> dict[str, int]:
    """Every item, memory first then the disk, each image by offset (so a self reference always
    names an item already read, as the original expected)."""
    kinds = {number: kind for kind, (number, _) in images.items()}
    counts = {}
    for kind in ("memory", "disk"):
        number, image = images[kind]
        frames = list(reader.frames_of(number))
        advance = progress.start(f"export {image.name}", sum(f.length for f in frames))
        count = 0
        for frame in frames:
            codec = meta.codecs().get(frame.codec)
            if codec is None:
                raise FormatError(f"frame at byte {frame.file_offset} names codec {frame.codec}, which is not listed")
            cols = reader.items(frame, registry.codec(codec.name))
            where = f"{reader.path}: frame at byte {frame.file_offset}"
            package.add(kind, _package_items(cols, kind, image, kinds, plan, bases, registry, where))
            count += len(cols)
            advance(frame.length)
        counts[image.name] = count
    return counts


def _package_items(
    cols: ItemColumns,
    kind: str,
    image: ImageRecord,
    kinds: dict[int, str],
    plan: _Conversion,
    bases: dict[str, SourceImage],
    registry: Registry,
    where: str,
) -> _Records:
    """One frame's items as package records."""
    offsets = cols.offsets.astype(np.int64)
    lengths = cols.lengths
    if (
        not np.isin(cols.types, [int(t) for t in ITEM_TYPES[kind]]).all()
        or (offsets % CHUNK).any()
        or (lengths != np.minimum(CHUNK, image.size - offsets)).any()
    ):
        raise FormatError(f"{where}: items that are not whole {CHUNK}-byte units of {image.name}")
    refs = cols.refs.astype(np.int64)
    values = cols.values.copy()
    payloads: list[bytes | memoryview | None] = list(cols.payloads)
    for row in np.flatnonzero(np.isin(refs, [int(Ref.BASE_MEM), int(Ref.BASE_DISK)])).tolist():
        if split_address(int(values[row]))[0]:
            raise FormatError(f"{where}: a base reference names a second base")
    for row in np.flatnonzero(refs == Ref.SELF).tolist():
        number, at = split_address(int(values[row]))
        if number not in kinds:
            raise FormatError(f"{where}: a self reference names image {number}, which does not exist")
        values[row] = self_index(kinds[number], at)
    for ref in np.unique(refs).tolist():
        if ref in plan.kept and not (ref in _SAME_ENCODING and _past_base(offsets, lengths, refs == ref, image)):
            continue
        rows = np.flatnonzero(refs == ref)
        if kind not in bases:  # the plan found none of these in the statistics: the overlay lied
            raise ConfigError(f"{where}: items of ref {ref:#x} must be decoded: give --base-{kind}")
        encoder = plan.decoder(ref, registry)
        base = bases[kind]
        at = rows.tolist()
        try:
            units = encoder.decode(
                [memoryview(base.padded(int(offsets[r]), int(lengths[r]))) for r in at],
                [memoryview(cols.payloads[r]) for r in at],  # type: ignore[arg-type]
                [int(lengths[r]) for r in at],
            )
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        for r, unit in zip(at, units, strict=True):
            if len(unit) != lengths[r]:
                raise FormatError(f"{where}: a {encoder.name} payload decodes to {len(unit)} bytes")
            payloads[r] = unit
        refs[rows] = int(Ref.RAW)
        plan.converted[encoder.name] += len(at)
    packed = pack_items(offsets, lengths, refs, cols.types, values, payloads, cols.live_seqs)
    ends = np.cumsum(item_sizes(refs, cols.types, payloads))
    return _Records(packed, (offsets // CHUNK).tolist(), ends.tolist())


def _past_base(offsets: np.ndarray, lengths: np.ndarray, rows: np.ndarray, image: ImageRecord) -> bool:
    return bool((offsets[rows] + lengths[rows] > image.base.size).any())


@attrs.frozen
class _Records:
    """Packed DeltaItems, their chunk numbers, and where each record ends in ``data``."""

    data: bytes
    chunks: list[int]
    ends: list[int]


class _PackageWriter:
    """The zip: blobs compressed on the pool as they fill and stored in order, ``overlay-meta``
    once their sizes are known."""

    def __init__(self, file: BinaryIO, level: int, blob_size: int, pool: ThreadPoolExecutor) -> None:
        self.file = file
        self.zip = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.zip.comment = ZIP_COMMENT
        self.level = level
        self.blob_size = blob_size
        self.pool = pool
        self.blobs: list[BlobInfo] = []
        self._parts: list[bytes] = []
        self._bytes = 0
        self._chunks: dict[str, list[int]] = {"memory": [], "disk": []}
        self._pending: collections.deque[tuple[Future[bytes], dict[str, list[int]]]] = collections.deque()

    @property
    def blob_count(self) -> int:
        return len(self.blobs)

    def add(self, kind: str, records: _Records) -> None:
        """Append ``records`` of ``kind``, cut between items into blobs of about ``blob_size``."""
        first, start = 0, 0
        count = len(records.chunks)
        while first < count:
            room = self.blob_size - self._bytes
            last = bisect.bisect_right(records.ends, start + room, lo=first)
            if last == first:
                if self._bytes:
                    self._close_blob()
                    continue
                last = first + 1  # a record larger than a blob gets a blob of its own
            end = records.ends[last - 1]
            self._parts.append(records.data[start:end])
            self._bytes += end - start
            self._chunks[kind] += records.chunks[first:last]
            first, start = last, end
            if self._bytes >= self.blob_size:
                self._close_blob()

    def _close_blob(self) -> None:
        if not self._parts:
            return
        data = b"".join(self._parts)
        future = self.pool.submit(lzma.compress, data, format=lzma.FORMAT_XZ, preset=self.level)
        self._pending.append((future, self._chunks))
        self._parts, self._bytes, self._chunks = [], 0, {"memory": [], "disk": []}
        self._drain(2)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            future, chunks = self._pending.popleft()
            stored = future.result()
            name = blob_name(len(self.blobs) + 1)
            self._store(name, stored)
            self.blobs.append(BlobInfo(name, len(stored), chunks["disk"], chunks["memory"]))

    def _store(self, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        self.zip.writestr(info, data)

    def finish(self, base_sha256: str, disk_size: int, memory_size: int) -> int:
        """Write the last blob and ``overlay-meta``; the package's size."""
        self._close_blob()
        self._drain(0)
        self._store(META_NAME, PackageMeta(base_sha256, disk_size, memory_size, self.blobs).to_msgpack())
        self.zip.close()
        self.file.flush()
        return os.fstat(self.file.fileno()).st_size
