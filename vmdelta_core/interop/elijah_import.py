"""``vmdelta import``: an overlay package of the original VM-synthesis system into a vmdelta overlay.

The package is untrusted (:mod:`.elijah` checks its structure). Its items are applied, in the
package's order, to copies of the bases the user gives: every field is checked on the way (type,
offset, length, the base or earlier item a reference names, the payload), and the rebuilt images
give the digests the new overlay records, so ``vmdelta apply`` verifies the result as it does for
any overlay. The items are then written in vmdelta's order (memory, then the disk; by offset)
through :class:`~vmdelta_core.overlay.container.OverlayWriter`: RAW items read back from the
rebuilt copy, encoded items keep their payload, a self reference whose target would come later
in that order is stored RAW, and later references to the same content point to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import numpy as np

from vmdelta_core.components import Encoder, SourceImage
from vmdelta_core.config import check_codec_level, recorded_name
from vmdelta_core.errors import BaseMismatchError, FormatError, PluginError
from vmdelta_core.fileio import check_input, copy_range, open_file_image
from vmdelta_core.interop.elijah import (
    CHUNK,
    MAX_ITEM,
    META_NAME,
    BlobInfo,
    Item,
    ItemStream,
    PackageReader,
    inflate,
    parse_self_index,
)
from vmdelta_core.outputs import OutputSet, PendingFile, storage_error
from vmdelta_core.overlay.container import OverlayWriter
from vmdelta_core.overlay.digest import file_digest
from vmdelta_core.overlay.items import join_addresses
from vmdelta_core.overlay.metadata import (
    BaseRecord,
    ComponentRecord,
    EncoderUse,
    ImageRecord,
    ImageStatistics,
    OverlayMetadata,
    Settings,
)
from vmdelta_core.overlay.schema import Ref
from vmdelta_core.plugins import core_version
from vmdelta_core.records import NullProgress, Progress
from vmdelta_core.registry import ComponentInfo, Registry, default_registry

__all__ = ["ImportReport", "import_elijah"]

#: the images a package describes, in vmdelta's order, and their names in the overlay
KINDS = ("memory", "disk")
_NAMES = {"memory": "memory", "disk": "disk0"}
_SOURCE = "file"
_FRAME_SIZE = 4 << 20
_BATCH = 2048  # items handed to the writer at a time
_REF_NAMES = {Ref.XDELTA: "XDELTA", Ref.BSDIFF: "BSDIFF", Ref.XOR: "XOR"}


@attrs.frozen
class ImportReport:
    """What :func:`import_elijah` wrote."""

    output: Path
    size: int
    seconds: float
    blobs: int
    #: per image (by its name in the overlay): items of the package, and how many of its self
    #: references were stored RAW
    items: dict[str, int]
    self_as_raw: dict[str, int]
    metadata: OverlayMetadata = attrs.field(repr=False)


def import_elijah(
    package: Path,
    output: Path,
    *,
    base_memory: Path,
    base_disk: Path,
    codec: str = "zstd",
    level: int | None = None,
    threads: int | None = None,
    registry: Registry | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Write the vmdelta overlay ``output`` that rebuilds what the package ``package`` rebuilds
    from ``base_memory`` and ``base_disk`` (raw files: the memory snapshot and disk the package
    was made against). ``output`` appears only when everything checked.

    :raises BaseMismatchError: ``base_disk`` is not the base VM the package names.
    :raises FormatError: the package is damaged or hostile (one line naming what).
    :raises PluginError: its items use an encoding no installed encoder decodes.
    """
    started = time.monotonic()
    registry = registry or default_registry()
    progress = progress or NullProgress()
    package, output = Path(package), Path(output)
    codec_info = registry.info("codec", codec)
    check_codec_level(codec_info.component, level)
    for path, what in ((package, "package"), (base_memory, "base memory"), (base_disk, "base disk")):
        check_input(path, what)
    with contextlib.ExitStack() as stack:
        outputs = stack.enter_context(OutputSet([package, base_memory, base_disk]))
        pending = outputs.add(output)
        reader = stack.enter_context(PackageReader(package))
        meta = reader.meta
        _check_base_vm(Path(base_disk), meta.base_vm_sha256, progress)
        bases = {
            "memory": stack.enter_context(open_file_image(Path(base_memory), "memory")),
            "disk": stack.enter_context(open_file_image(Path(base_disk), "disk")),
        }
        sizes = {"memory": meta.memory_size, "disk": meta.disk_size}
        try:
            scratch = {
                kind: _base_copy(outputs.scratch(output, f".{kind}"), Path(path), sizes[kind], kind, output)
                for kind, path in (("memory", base_memory), ("disk", base_disk))
            }
            rebuild = _Rebuild(sizes, bases, {k: p.fd for k, p in scratch.items()}, _Decoders(registry))
            advance = progress.start("read package", sum(blob.size for blob in meta.blobs))
            for blob in meta.blobs:
                _read_blob(reader, blob, rebuild, f"{package}: blob {blob.name}")
                advance(blob.size)
            rebuild.resolve_self_references(str(package))
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1))
            with open(pending.path, "wb") as f:
                size, metadata, self_as_raw = _write_overlay(
                    f, rebuild, scratch, bases, registry, codec_info, level, pool, package, progress
                )
        except OSError as exc:  # no space for the rebuilt copies or the overlay, most likely
            raise outputs.explain(exc, output) from None
        outputs.commit()
    return ImportReport(
        output=output,
        size=size,
        seconds=time.monotonic() - started,
        blobs=len(meta.blobs),
        items={_NAMES[kind]: len(rebuild.items[kind]) for kind in KINDS},
        self_as_raw=self_as_raw,
        metadata=metadata,
    )


def _check_base_vm(base_disk: Path, expected: str, progress: Progress) -> None:
    """The package names its base VM by the SHA-256 of the base disk: check it first."""
    advance = progress.start("check base disk", os.path.getsize(base_disk))
    digest = hashlib.sha256()
    with open(base_disk, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            advance(len(chunk))
    if digest.hexdigest() != expected:
        raise BaseMismatchError(
            f"{base_disk} is not the base VM of this package (its SHA-256 is {digest.hexdigest()}, "
            f"the package names {expected})"
        )


def _base_copy(pending: PendingFile, base: Path, size: int, kind: str, output: Path) -> PendingFile:
    """``pending`` holding the base's bytes, cut or zero-extended to ``size``: what a package
    rebuilds before its items are applied."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
        try:
            copy_range(fd, pending.fd, 0, min(size, os.fstat(fd).st_size))
        finally:
            os.close(fd)
        os.ftruncate(pending.fd, size)
    except OSError as exc:
        raise storage_error(exc, output, f"making the {size}-byte {kind} image the package claims, beside") from None
    return pending


def _read_blob(reader: PackageReader, blob: BlobInfo, rebuild: _Rebuild, where: str) -> None:
    """Apply one blob's items, checking that they are exactly the chunks ``overlay-meta`` lists."""
    stream = ItemStream(where)
    chunks: dict[str, list[int]] = {"memory": [], "disk": []}
    count = 0
    for data in inflate(reader.member_chunks(blob.name), blob.item_count * MAX_ITEM, where):
        for item in stream.feed(data):
            count += 1
            if count > blob.item_count:
                raise FormatError(f"{where} holds more items than the {blob.item_count} {META_NAME} lists")
            rebuild.add(item, where)
            chunks[item.kind].append(item.offset // CHUNK)
    stream.close()
    if chunks["memory"] != list(blob.memory_chunks) or chunks["disk"] != list(blob.disk_chunks):
        raise FormatError(f"{where} holds other chunks than {META_NAME} lists for it")


class _Decoders:
    """The installed encoders that decode the package's XDELTA, BSDIFF and XOR items, by ref."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._found: dict[int, tuple[Encoder, ComponentInfo]] = {}

    def get(self, ref: int) -> tuple[Encoder, ComponentInfo]:
        if ref not in self._found:
            for name in self.registry.names("encoder"):
                encoder = self.registry.encoder(name)
                if encoder.wire_ref == ref:
                    self._found[ref] = (encoder, self.registry.info("encoder", name))
                    break
            else:
                raise PluginError(
                    f"the package holds {_REF_NAMES.get(ref, hex(ref))} items (ref {ref:#x}); decoding them "
                    "needs an installed encoder of that ref (see `vmdelta plugins`)"
                )
        return self._found[ref]


@attrs.define
class _Entry:
    """An item as the new overlay will store it: ``payload`` only for encoded items (RAW items
    are read back from the rebuilt copy), ``target`` for self references."""

    offset: int
    length: int
    ref: int
    value: int = 0
    payload: bytes | None = None
    target: tuple[str, int] | None = None


class _Rebuild:
    """The package's items applied to copies of the bases, each checked as it comes."""

    def __init__(
        self, sizes: dict[str, int], bases: dict[str, SourceImage], fds: dict[str, int], decoders: _Decoders
    ) -> None:
        self.sizes = sizes
        self.bases = bases
        self.fds = fds
        self.decoders = decoders
        self.items: dict[str, dict[int, _Entry]] = {kind: {} for kind in KINDS}
        self.encoders_used: dict[int, ComponentInfo] = {}

    def add(self, item: Item, where: str) -> None:
        kind, offset, length = item.kind, item.offset, item.length
        size = self.sizes[kind]
        at = f"{where}: {kind} item at offset {offset}"
        if offset % CHUNK or offset >= size:
            raise FormatError(f"{at} is not a chunk of the {size}-byte {kind} image")
        if length != min(CHUNK, size - offset):
            raise FormatError(f"{at} has length {length}, not {min(CHUNK, size - offset)}")
        if offset in self.items[kind]:
            raise FormatError(f"{at} repeats an earlier item of the same chunk")
        entry = _Entry(offset, length, item.ref)
        if item.ref == Ref.SELF:
            entry.target = parse_self_index(item.value)
        else:
            content = self._content(item, entry, at)
            if content is None:
                _write_zeros(self.fds[kind], offset, length)
            else:
                os.pwrite(self.fds[kind], content, offset)
        self.items[kind][offset] = entry

    def _content(self, item: Item, entry: _Entry, at: str) -> bytes | memoryview | None:
        ref, length = item.ref, item.length
        if ref == Ref.ZEROS:
            return None
        if ref == Ref.RAW:
            assert item.payload is not None
            if len(item.payload) != length:
                raise FormatError(f"{at}: a RAW payload of {len(item.payload)} bytes")
            return item.payload
        if ref in (Ref.BASE_MEM, Ref.BASE_DISK):
            base = self.bases["memory" if ref == Ref.BASE_MEM else "disk"]
            if item.value + length > base.size:
                raise FormatError(f"{at} points outside the {base.size}-byte base {base.kind}")
            entry.value = item.value
            return memoryview(base.data[item.value : item.value + length])
        if ref == Ref.SELF_HASH:
            raise FormatError(f"{at}: SELF_HASH items (the original's residue variant) are not supported")
        encoder, info = self.decoders.get(ref)
        assert item.payload is not None
        base = self.bases[item.kind].padded(item.offset, length)
        try:
            (content,) = encoder.decode([memoryview(base)], [memoryview(item.payload)], [length])
        except FormatError as exc:
            raise FormatError(f"{at}: {exc}") from None
        if len(content) != length:
            raise FormatError(f"{at}: a {encoder.name} payload decodes to {len(content)} bytes, not {length}")
        self.encoders_used[ref] = info
        entry.payload = item.payload
        return content

    def resolve_self_references(self, where: str) -> None:
        """Write every self reference's content: the content of the first item along its chain
        that is not one, wherever that item came in the package."""
        for kind in KINDS:
            for entry in self.items[kind].values():
                if entry.target is None:
                    continue
                final = self._final_target(kind, entry, where)
                data = os.pread(self.fds[final[0]], entry.length, final[1])
                os.pwrite(self.fds[kind], data, entry.offset)
                entry.target = final

    def _final_target(self, kind: str, entry: _Entry, where: str) -> tuple[str, int]:
        at = f"{where}: the {kind} item at offset {entry.offset}"
        seen = {(kind, entry.offset)}
        target = entry.target
        assert target is not None
        while True:
            found = self.items[target[0]].get(target[1])
            if found is None:
                raise FormatError(
                    f"{at} refers to {target[0]} offset {target[1]}, which no item of the package rebuilds"
                )
            if found.length != entry.length:
                raise FormatError(
                    f"{where}: the {kind} item at offset {entry.offset} refers to a unit of another length"
                )
            if found.target is None:
                return target
            if target in seen:
                raise FormatError(
                    f"{where}: the {kind} item at offset {entry.offset} is part of a loop of self references"
                )
            seen.add(target)
            target = found.target


def _write_zeros(fd: int, offset: int, length: int) -> None:
    os.pwrite(fd, bytes(length), offset)


# --------------------------------------------------------------------------------------------
# the vmdelta overlay
# --------------------------------------------------------------------------------------------


def _write_overlay(
    f: object,
    rebuild: _Rebuild,
    scratch: dict[str, PendingFile],
    bases: dict[str, SourceImage],
    registry: Registry,
    codec_info: ComponentInfo,
    level: int | None,
    pool: ThreadPoolExecutor,
    package: Path,
    progress: Progress,
) -> tuple[int, OverlayMetadata, dict[str, int]]:
    """Every item in vmdelta's order, then the metadata: the overlay's size, metadata, and the
    self references stored RAW per image."""
    writer = OverlayWriter(
        f,  # type: ignore[arg-type]
        codec=codec_info.component,
        codec_id=0,
        level=level,
        frame_size=_FRAME_SIZE,
        pool=pool,
    )
    images, self_as_raw = [], {}
    holders: dict[tuple[str, int], tuple[int, int]] = {}
    try:
        for number, kind in enumerate(KINDS):
            stats, self_as_raw[_NAMES[kind]] = _write_image(writer, number, rebuild, scratch[kind].fd, kind, holders)
            images.append((kind, stats))
    except BaseException:
        writer.abort()
        raise
    writer.flush()
    records = []
    for number, (kind, stats) in enumerate(images):
        advance = progress.start(f"digest {_NAMES[kind]}", rebuild.sizes[kind] + bases[kind].size)
        digest = file_digest(scratch[kind].path)
        base = bases[kind]
        assert base.file is not None
        fingerprint = file_digest(base.file)
        advance(rebuild.sizes[kind] + base.size)
        records.append(
            ImageRecord(
                name=_NAMES[kind],
                kind=kind,  # type: ignore[arg-type]
                source=_SOURCE,
                base_source=_SOURCE,
                size=rebuild.sizes[kind],
                digest=digest,
                base=BaseRecord(recorded_name(base.file), _SOURCE, base.size, fingerprint),
                statistics=_with_stored_bytes(stats, number, writer, rebuild.encoders_used),
                artifact=None,
                artifact_digest=digest,  # the file source's artifact is its image
                encoders=tuple(stats.encoders),
            )
        )
    metadata = OverlayMetadata(
        unit_size=CHUNK,
        creator={"name": "vmdelta-core", "version": core_version()},
        components=_components(registry, codec_info, rebuild.encoders_used),
        images=records,
        settings=Settings(
            unit_size=CHUNK,
            codec=codec_info.name,
            level=level,
            frame_size=_FRAME_SIZE,
            images=[{"name": _NAMES[kind], "imported_from": recorded_name(package)} for kind in KINDS],
        ),
    )
    size = writer.finish(metadata.to_json())
    return size, metadata, self_as_raw


def _with_stored_bytes(
    stats: ImageStatistics, number: int, writer: OverlayWriter, encoders: dict[int, ComponentInfo]
) -> ImageStatistics:
    """``stats`` with the image's share of the compressed frames: in all, per encoder, and for
    the references (as ``create`` records them)."""
    names = {ref: info.name for ref, info in encoders.items()}
    names[int(Ref.RAW)] = "raw"
    uses, references = dict(stats.encoders), 0.0
    for (image, ref), share in writer.stored_bytes_by_ref.items():
        if image != number:
            continue
        if names.get(ref) in uses:
            uses[names[ref]] = attrs.evolve(uses[names[ref]], stored_bytes=round(share))
        else:
            references += share
    return attrs.evolve(
        stats,
        encoders=uses,
        stored_bytes=writer.stored_bytes_by_image.get(number, 0),
        references_stored_bytes=round(references),
    )


def _components(registry: Registry, codec: ComponentInfo, encoders: dict[int, ComponentInfo]) -> list[ComponentRecord]:
    def record(info: ComponentInfo, **ids: int) -> ComponentRecord:
        return ComponentRecord(info.kind, info.name, info.distribution, info.version, **ids)  # type: ignore[arg-type]

    out = [record(codec, id=0), record(registry.info("encoder", "raw"), ref=int(Ref.RAW))]
    out += [record(info, ref=ref) for ref, info in sorted(encoders.items())]
    return [*out, record(registry.info("source", _SOURCE))]


def _write_image(
    writer: OverlayWriter,
    number: int,
    rebuild: _Rebuild,
    fd: int,
    kind: str,
    holders: dict[tuple[str, int], tuple[int, int]],
) -> tuple[ImageStatistics, int]:
    """One image's items, by offset; its statistics and how many self references became RAW.

    ``holders`` maps each item a self reference resolves to (kind, offset) onto the first unit in
    vmdelta's order that holds its content: the item itself, or the first self reference to it,
    stored RAW because its target comes later. Later references point there.
    """
    entries = [rebuild.items[kind][offset] for offset in sorted(rebuild.items[kind])]
    tail = _tail_entry(entries, rebuild.sizes[kind], rebuild.bases[kind].size, fd)
    if tail is not None:
        entries.append(tail)
    counts = {"zero": 0, "base_memory": 0, "base_disk": 0, "earlier": 0}
    uses: dict[str, list[int]] = {}
    self_as_raw = 0
    names = {ref: info.name for ref, info in rebuild.encoders_used.items()}
    names[int(Ref.RAW)] = "raw"
    for start in range(0, len(entries), _BATCH):
        batch = entries[start : start + _BATCH]
        refs, values, payloads = [], [], []
        for entry in batch:
            ref, value, payload = entry.ref, entry.value, entry.payload
            if entry.target is None:
                holders.setdefault((kind, entry.offset), (number, entry.offset))
            else:
                holder = holders.get(entry.target)
                if holder is not None:
                    value = int(join_addresses(holder[0], np.array([holder[1]]))[0])
                    counts["earlier"] += 1
                else:  # its target comes later: this unit holds the content from here on
                    ref, self_as_raw = int(Ref.RAW), self_as_raw + 1
                    holders[entry.target] = (number, entry.offset)
            if ref == Ref.RAW:
                payload = os.pread(fd, entry.length, entry.offset)
            elif ref == Ref.ZEROS:
                counts["zero"] += 1
            elif ref in (Ref.BASE_MEM, Ref.BASE_DISK):
                counts["base_memory" if ref == Ref.BASE_MEM else "base_disk"] += 1
            if payload is not None:
                use = uses.setdefault(names[ref], [0, 0])
                use[0] += 1
                use[1] += len(payload)
            refs.append(ref)
            values.append(value)
            payloads.append(payload)
        types = _types(kind, len(batch))
        writer.add_items(
            number,
            np.array([e.offset for e in batch], dtype=np.uint64),
            np.array([e.length for e in batch], dtype=np.int64),
            np.array(refs, dtype=np.int64),
            types,
            np.array(values, dtype=np.uint64),
            payloads,
        )
    size = rebuild.sizes[kind]
    stats = ImageStatistics(
        units=-(-size // CHUNK),
        changed=len(entries),
        encoders={name: EncoderUse(units, nbytes) for name, (units, nbytes) in uses.items()},
        **counts,
    )
    return stats, self_as_raw


def _tail_entry(entries: list[_Entry], size: int, base_size: int, fd: int) -> _Entry | None:
    """An item for the last unit of an image grown past its base that no item reaches: the
    original rebuilt such a tail as zeros without a word, a vmdelta overlay says it (``apply``
    refuses a size that neither the base nor an item accounts for)."""
    reach = entries[-1].offset + entries[-1].length if entries else 0
    if size <= max(base_size, reach):
        return None
    offset = (size - 1) // CHUNK * CHUNK
    content = os.pread(fd, size - offset, offset)
    return _Entry(offset, size - offset, int(Ref.ZEROS if not any(content) else Ref.RAW))


def _types(kind: str, count: int) -> np.ndarray:
    """The item type column of ``count`` items of ``kind`` (live iterations are merged away)."""
    return np.full(count, 1 if kind == "memory" else 2, dtype=np.int64)
