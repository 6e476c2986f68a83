"""``apply`` (VM synthesis): base + overlay -> the customized VM, verified before it appears.

Order of trust: every output is checked (never an input, never a non-regular file, its folder
writable), the overlay's checksums are verified, then every base is checked against the
fingerprint recorded at create time — all before a single output byte is written. Each image is
rebuilt in an unnamed file beside its output and checked against the recorded digest; only when
every image has been rebuilt, checked and turned into its artifact by the source are the outputs
put in place, together (:mod:`vmdelta_core.outputs`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from vmdelta_core.components import Codec, Encoder, RebuiltImage, SourceImage
from vmdelta_core.config import PATH_OPTIONS, ApplyConfig, ApplyImageSpec, check_source_options
from vmdelta_core.errors import (
    BaseMismatchError,
    ConfigError,
    FormatError,
    IntegrityError,
    PluginError,
)
from vmdelta_core.fileio import check_input, copy_range, data_extents, punch_hole, punch_zero_runs
from vmdelta_core.index import image_digest, load_or_build_index
from vmdelta_core.outputs import OutputSet, PendingFile
from vmdelta_core.overlay.container import KIND_ENVELOPE, OverlayReader
from vmdelta_core.overlay.digest import ImageDigest, digest_kind, file_digest
from vmdelta_core.overlay.envelope import decompress_envelope
from vmdelta_core.overlay.items import split_address
from vmdelta_core.overlay.metadata import OverlayMetadata, read_metadata
from vmdelta_core.overlay.schema import ItemType, Ref
from vmdelta_core.records import ApplyReport, NullProgress, Progress, RebuiltReport
from vmdelta_core.registry import Registry, default_registry

__all__ = ["apply_overlay"]

_DECODE_BATCH = 256
_VALUE_REFS = {int(Ref.BASE_MEM): "memory", int(Ref.BASE_DISK): "disk"}


def apply_overlay(
    config: ApplyConfig, *, registry: Registry | None = None, progress: Progress | None = None
) -> ApplyReport:
    """Rebuild every image of ``config.overlay`` from the bases in ``config`` and verify it."""
    started = time.monotonic()
    registry = registry or default_registry()
    progress = progress or NullProgress()
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(OverlayReader(config.overlay))
        # every output checked and its file made (proving its folder writable) before any work
        outputs = stack.enter_context(OutputSet(_inputs(config)))
        targets = [_Targets.make(outputs, spec) for spec in config.images]
        reader.verify(progress.start("verify overlay", reader.size))
        meta = read_metadata(reader.metadata, reader.frames)
        _match_images(meta, config)
        if config.strict:
            lossy = {f["name"]: f["dropped"] for image in meta.images for f in image["filters"] if f["dropped"]}
            if lossy:
                dropped = ", ".join(f"{n} dropped {c}" for n, c in lossy.items())
                raise ConfigError(f"--strict: this overlay rebuilds some units from the base ({dropped})")
        codecs, encoders = _components(meta, registry)
        for number, image in enumerate(meta.images):
            if image["kind"] not in registry.source(image["source"]).kinds:
                raise FormatError(
                    f"overlay metadata: images[{number}] names source {image['source']!r}, "
                    f"which does not write {image['kind']} images"
                )
        bases = [
            _open_base(stack, registry, meta, number, spec, config, progress)
            for number, spec in enumerate(config.images)
        ]
        for number, (image, base) in enumerate(zip(meta.images, bases, strict=True)):
            _check_claimed_size(reader, number, image, base)

        try:
            results = _rebuild_all(stack, reader, meta, config, registry, codecs, encoders, bases, targets, progress)
        except OSError as exc:
            raise outputs.explain(exc, ", ".join(str(spec.output) for spec in config.images)) from None
        outputs.commit()
    return ApplyReport(overlay=config.overlay, seconds=time.monotonic() - started, images=tuple(results))


# ------------------------------------------------------------------------------------------------


@attrs.frozen
class _Targets:
    """One image's files: the artifact, side outputs (an x-ignore-shared RAM file), and the
    scratch file the image is rebuilt in."""

    output: PendingFile
    sides: dict[str, PendingFile]
    scratch: PendingFile

    @classmethod
    def make(cls, outputs: OutputSet, spec: ApplyImageSpec) -> _Targets:
        output = outputs.add(spec.output)
        sides = {
            key: outputs.add(Path(value))
            for key, value in spec.output_options.items()
            if key in PATH_OPTIONS and key.endswith("_output") and value
        }
        return cls(output, sides, outputs.scratch(spec.output))

    def adopt(self, path: Path) -> None:
        """``RebuiltImage.move_to``: the scratch file becomes the output it names."""
        for pending in (self.output, *self.sides.values()):
            if Path(path) == pending.path:
                pending.take(self.scratch)
                return
        raise PluginError(f"a source moved the rebuilt image to {path}, which is not an output it was given")


def _inputs(config: ApplyConfig) -> list[Path]:
    inputs = [config.overlay]
    for spec in config.images:
        inputs.append(spec.base)
        inputs += [Path(v) for k, v in spec.base_options.items() if k in PATH_OPTIONS and v]
    return inputs


def _open_base(
    stack: contextlib.ExitStack,
    registry: Registry,
    meta: OverlayMetadata,
    number: int,
    spec: ApplyImageSpec,
    config: ApplyConfig,
    progress: Progress,
) -> SourceImage:
    """Open a base and prove it is the one the overlay was made from."""
    image = meta.images[number]
    source = registry.source(image["base_source"])
    check_input(spec.base, "base")
    for key, value in spec.base_options.items():
        if key in PATH_OPTIONS and value:
            check_input(value, f"base option {key}:")
    check_source_options(source, spec.base_options, f"base_options of {spec.base}")
    base = stack.enter_context(source.open(spec.base, kind=image["kind"], options=dict(spec.base_options)))
    expected = image["base"]
    if base.size != expected["size"]:
        raise BaseMismatchError(
            f"{spec.base} is not the base this overlay was made from: "
            f"{base.size} bytes, expected {expected['size']} ({expected['name']})"
        )
    advance = progress.start(f"check base {spec.base.name}", base.size)
    kind = digest_kind(expected["fingerprint"])
    if kind is ImageDigest:
        fingerprint = load_or_build_index(
            spec.base,
            base,
            source=image["base_source"],
            unit=meta.unit_size,
            options=dict(spec.base_options),
            cache_dir=config.cache_dir,
            progress=advance,
        )[0].fingerprint
    else:  # an overlay from before the chunked digest: its base's digest as it was taken then
        fingerprint = image_digest(base, meta.unit_size, advance, kind=kind)
    if fingerprint != expected["fingerprint"]:
        raise BaseMismatchError(
            f"{spec.base} is not the base this overlay was made from (fingerprint differs from {expected['name']})"
        )
    return base


def _check_claimed_size(reader: OverlayReader, number: int, image: Mapping[str, Any], base: SourceImage) -> None:
    """An image may be larger than its base only as far as its items reach: a claimed size
    beyond that would cost time (hashing zeros) for data that is not there."""
    reach = max((f.end_offset for f in reader.frames_of(number)), default=0)
    if image["size"] > max(base.size, reach):
        raise FormatError(
            f"overlay claims {image['name']} is {image['size']} bytes, but its base holds {base.size} and its "
            f"items reach only byte {reach}: refusing an implausible size"
        )


def _rebuild_all(
    stack: contextlib.ExitStack,
    reader: OverlayReader,
    meta: OverlayMetadata,
    config: ApplyConfig,
    registry: Registry,
    codecs: Mapping[int, Codec],
    encoders: Mapping[int, Encoder],
    bases: list[SourceImage],
    targets: list[_Targets],
    progress: Progress,
) -> list[RebuiltReport]:
    """Rebuild and verify every image, then write every artifact: all into pending files."""
    pool = stack.enter_context(ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="vmdelta"))
    scratch_fds = [t.scratch.fd for t in targets]
    prepared = []
    for number, (image, spec, files) in enumerate(zip(meta.images, config.images, targets, strict=True)):
        _copy_base(
            bases[number],
            files.scratch.fd,
            image["size"],
            meta.unit_size,
            progress.start(f"copy base {spec.base.name}", image["size"]),
        )
        changed = _apply_items(number, image, reader, meta, codecs, encoders, bases, scratch_fds, pool, progress)
        for base in bases:  # base and self references read anywhere: drop those pages
            base.release(0, base.size)
        if image.get("artifact_digest") and not spec.output_format:
            digest = image["digest"]  # the artifact's own digest, checked below, covers the image
        else:
            progress.start(f"verify {image['name']}", image["size"])
            digest = file_digest(files.scratch.path, digest_kind(image["digest"]))
            if digest != image["digest"]:
                raise IntegrityError(f"rebuilt {image['name']} does not match the digest recorded at create time")
        rebuilt = RebuiltImage(
            path=files.scratch.path,
            size=image["size"],
            unit_size=meta.unit_size,
            envelope=_envelope(reader, number, bases[number].envelope),
            layout=image["layout"],
            changed=changed,
            base=bases[number],
            base_path=spec.base,
            options={
                **dict(spec.output_options),
                **{key: str(side.path) for key, side in files.sides.items()},
                **({"output_format": spec.output_format} if spec.output_format else {}),
            },
            adopt=files.adopt,
        )
        prepared.append((image, spec, rebuilt, files, digest))

    # materialize only once every image verified, so a failure leaves no output behind
    results = []
    for image, spec, rebuilt, files, digest in prepared:
        registry.source(image["source"]).materialize(rebuilt, files.output.path)
        identical = False
        if image.get("artifact_digest") and not spec.output_format:
            if file_digest(files.output.path, digest_kind(image["artifact_digest"])) != image["artifact_digest"]:
                raise IntegrityError(f"rebuilt artifact {spec.output} differs from the one the overlay was made from")
            identical = True
        results.append(
            RebuiltReport(
                image["name"],
                image["kind"],
                spec.output,
                image["size"],
                digest,
                identical,
                {f["name"]: f["dropped"] for f in image["filters"]},
            )
        )
    return results


def _match_images(meta: OverlayMetadata, config: ApplyConfig) -> None:
    want = [image["kind"] for image in meta.images]
    got = [spec.kind for spec in config.images]
    if want != got:

        def describe(kinds: list[str]) -> str:
            disks = kinds.count("disk")
            parts = (["--memory"] if "memory" in kinds else []) + ([f"{disks} --disk"] if disks else [])
            return " and ".join(parts) or "nothing"

        raise ConfigError(f"this overlay holds {describe(want)} pair(s); the command gave {describe(got)}")
    if sorted(got, key=lambda k: k != "memory") != got:
        raise ConfigError("internal: memory image must come first")


def _components(meta: OverlayMetadata, registry: Registry) -> tuple[dict[int, Codec], dict[int, Encoder]]:
    codecs: dict[int, Codec] = {}
    encoders: dict[int, Encoder] = {}
    for component in meta.components:
        kind, name = component["kind"], component["name"]
        if kind not in ("codec", "encoder", "source"):
            continue
        try:
            instance = registry.info(kind, name).component
        except PluginError:
            raise PluginError(
                f"this overlay needs the {kind} {name!r} from {component['distribution']} "
                f"{component['version']}; install it (pip install {component['distribution']})"
            ) from None
        if kind == "codec":
            codecs[int(component["id"])] = instance
        elif kind == "encoder":
            encoders[int(component["ref"])] = instance
    return codecs, encoders


def _copy_base(base: SourceImage, fd: int, size: int, unit: int, advance: Any) -> None:
    """Start the rebuilt image as the base's image, sparse where the base is zero."""
    os.ftruncate(fd, size)
    limit = min(size, base.size)
    if base.file is not None:
        # the base image is a file: let the kernel copy its data extents (a reflink where it can)
        with open(base.file, "rb") as src:
            for start, length in data_extents(base.file, 0, limit).tolist():
                copy_range(src.fileno(), fd, start, min(length, limit - start))
                advance(length)
        return
    step = 16 << 20
    holes = base.holes.tolist()
    h = 0
    pos = 0
    while pos < limit:
        end = min(pos + step, limit)
        while h < len(holes) and holes[h][0] + holes[h][1] <= pos:
            h += 1
        if not (h < len(holes) and holes[h][0] <= pos and holes[h][0] + holes[h][1] >= end):
            punch_zero_runs(fd, pos, base.data[pos:end], unit)
            base.release(pos, end)
        advance(end - pos)
        pos = end


def _apply_items(
    number: int,
    image: Mapping[str, Any],
    reader: OverlayReader,
    meta: OverlayMetadata,
    codecs: Mapping[int, Codec],
    encoders: Mapping[int, Encoder],
    bases: list[SourceImage],
    rebuilt: list[int],
    pool: ThreadPoolExecutor,
    progress: Progress,
) -> np.ndarray:
    unit = meta.unit_size
    size = int(image["size"])
    fd = rebuilt[number]
    kind = image["kind"]
    allowed_types = (
        {int(ItemType.MEMORY), int(ItemType.MEMORY_LIVE)}
        if kind == "memory"
        else {int(ItemType.DISK), int(ItemType.DISK_LIVE)}
    )
    bases_by_kind = {"memory": [], "disk": []}
    for b, img in zip(bases, meta.images, strict=True):
        bases_by_kind[img["kind"]].append(b)
    base = bases[number]
    written: list[np.ndarray] = []
    previous = -1
    frames = list(reader.frames_of(number))
    advance = progress.start(f"rebuild {image['name']}", sum(f.length for f in frames))
    for frame in frames:
        codec = codecs.get(frame.codec)
        if codec is None:
            raise FormatError(
                f"frame at byte {frame.file_offset} names codec {frame.codec}, which the metadata does not list"
            )
        cols = reader.items(frame, codec)
        offsets = cols.offsets.astype(np.int64)
        lengths = cols.lengths
        where = f"frame at byte {frame.file_offset}"
        if len(cols):
            if not set(np.unique(cols.types).tolist()) <= allowed_types:
                raise FormatError(f"{where}: items of the wrong image type for {image['name']}")
            if (offsets % unit).any() or (offsets < 0).any() or (offsets >= size).any():
                raise FormatError(f"{where}: an item lies outside {image['name']} or off the unit grid")
            if (lengths != np.minimum(unit, size - offsets)).any():
                raise FormatError(f"{where}: an item's length does not match its unit")
            if offsets[0] < frame.first_offset or int(offsets[-1]) + int(lengths[-1]) > frame.end_offset:
                raise FormatError(f"{where}: items lie outside the range the index gives the frame")
            # address order: strictly increasing, except a live item may repeat the unit before it
            steps = np.diff(np.concatenate(([previous], offsets)))
            if ((steps < 0) | ((steps == 0) & (cols.live_seqs < 0))).any():
                raise FormatError(f"{where}: items are not in address order")
            previous = int(offsets[-1])
        refs = cols.refs
        # self references last: their targets may be items of this very frame
        for ref in sorted(np.unique(refs).tolist(), key=lambda r: r == Ref.SELF):
            rows = np.flatnonzero(refs == ref)
            if ref == Ref.ZEROS:
                for o, n in zip(offsets[rows].tolist(), lengths[rows].tolist(), strict=True):
                    punch_hole(fd, o, n)
            elif ref in _VALUE_REFS:
                pool_of = bases_by_kind[_VALUE_REFS[ref]]
                for row in rows.tolist():
                    ordinal, at = split_address(int(cols.values[row]))
                    n = int(lengths[row])
                    if ordinal >= len(pool_of) or at + n > pool_of[ordinal].size:
                        raise FormatError(f"{where}: a base reference points outside the base")
                    os.pwrite(fd, pool_of[ordinal].data[at : at + n], int(offsets[row]))
            elif ref == Ref.SELF:
                for row in rows.tolist():
                    target, at = split_address(int(cols.values[row]))
                    n = int(lengths[row])
                    here = (number, int(offsets[row]))
                    if (target, at) >= here or at + n > int(meta.images[target]["size"]):
                        raise FormatError(f"{where}: a self reference does not point to an earlier unit")
                    data = os.pread(rebuilt[target], n, at)
                    os.pwrite(fd, data, int(offsets[row]))
            elif ref == Ref.SELF_HASH:
                raise FormatError(f"{where}: SELF_HASH items are not used by overlay v1")
            else:
                encoder = encoders.get(ref)
                if encoder is None:
                    raise FormatError(f"{where}: items use ref {ref:#x}, which the metadata does not list")
                _decode_rows(encoder, rows, cols, offsets, lengths, base, unit, fd, pool, where)
        written.append(offsets // unit)
        advance(frame.length)
    return np.sort(np.concatenate(written)) if written else np.zeros(0, dtype=np.int64)


def _decode_rows(
    encoder: Encoder,
    rows: np.ndarray,
    cols: Any,
    offsets: np.ndarray,
    lengths: np.ndarray,
    base: SourceImage,
    unit: int,
    fd: int,
    pool: ThreadPoolExecutor,
    where: str,
) -> None:
    def base_unit(o: int, n: int) -> memoryview:
        got = base.data[o : min(o + n, base.size)].tobytes() if o < base.size else b""
        return memoryview(got.ljust(n, b"\0"))

    chunks = [rows[i : i + _DECODE_BATCH] for i in range(0, rows.size, _DECODE_BATCH)]

    def decode(chunk: np.ndarray) -> list[bytes]:
        bases = [base_unit(int(offsets[r]), int(lengths[r])) for r in chunk.tolist()]
        payloads = [memoryview(cols.payloads[r]) for r in chunk.tolist()]
        return encoder.decode(bases, payloads, [int(lengths[r]) for r in chunk.tolist()])

    try:
        decoded = list(pool.map(decode, chunks))
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    for chunk, units in zip(chunks, decoded, strict=True):
        if len(units) != chunk.size:
            raise PluginError(f"encoder {encoder.name!r} decoded {len(units)} units of {chunk.size}")
        for r, data in zip(chunk.tolist(), units, strict=True):
            if len(data) != lengths[r]:
                raise FormatError(f"{where}: a {encoder.name} payload decodes to {len(data)} bytes, not {lengths[r]}")
            os.pwrite(fd, data, int(offsets[r]))


def _envelope(reader: OverlayReader, number: int, base_envelope: bytes) -> bytes:
    entries = list(reader.frames_of(number, KIND_ENVELOPE))
    if not entries:
        return b""
    if len(entries) > 1:
        raise FormatError(f"image {number} has {len(entries)} envelopes")
    entry = entries[0]
    return decompress_envelope(reader.stored(entry), entry.length, base_envelope, f"image {number}")
