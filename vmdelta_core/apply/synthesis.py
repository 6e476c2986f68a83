"""``apply`` (VM synthesis): base + overlay -> the customized VM, verified before it appears.

Order of trust: every output is checked (never an input, never a non-regular file, its folder
writable), the overlay's checksums are verified, then every base is checked against the
fingerprint recorded at create time (:mod:`.bases`) — all before a single output byte is
written. Each image is rebuilt in an unnamed file beside its output and checked against the
recorded digest (:mod:`.rebuild`); only when every image has been rebuilt, checked and turned
into its artifact by the source are the outputs put in place, together
(:mod:`vmdelta_core.outputs`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import attrs
import numpy as np

from vmdelta_core.apply.bases import Decoders, check_claimed_size, finish_overlay, open_base, read_overlay
from vmdelta_core.apply.feed import FileFeed, StreamFeed, open_feed
from vmdelta_core.apply.rebuild import ImageRebuilder, copy_base, verify_rebuilt
from vmdelta_core.apply.streamout import StreamedArtifact
from vmdelta_core.components import RebuiltImage, SourceImage
from vmdelta_core.config import ApplyConfig, ApplyImageSpec
from vmdelta_core.errors import ConfigError, IntegrityError, PluginError
from vmdelta_core.outputs import OutputSet, PendingFile, start_writeback
from vmdelta_core.overlay.container import FrameEntry
from vmdelta_core.overlay.digest import digest_kind, own_file_digest
from vmdelta_core.overlay.envelope import decompress_envelope
from vmdelta_core.overlay.metadata import ImageRecord, OverlayMetadata
from vmdelta_core.records import ApplyReport, NullProgress, Progress, RebuiltReport
from vmdelta_core.registry import Registry, default_registry, registry_of

__all__ = ["apply_overlay"]


def apply_overlay(
    config: ApplyConfig,
    *,
    registry: Registry | None = None,
    progress: Progress | None = None,
    stream: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    on_committed: Callable[[], None] | None = None,
    on_outputs: Callable[[Mapping[int, int]], None] | None = None,
    bases: Mapping[Path, SourceImage] | None = None,
) -> ApplyReport:
    """Rebuild every image of ``config.overlay`` from the bases in ``config`` and verify it.

    :param stream: read the overlay, in the stream form, from this file object (standard input,
        a socket) as it arrives, instead of from ``config.overlay`` (which then only names it).
        Once its prologue is checked, a thread of its own reads it ahead; should apply fail, that
        thread may still be waiting in a read when apply returns. Give an unbuffered file (as
        the command line does with standard input): a thread left waiting in a buffered reader
        holds its lock, which ends the interpreter with an abort at exit.
    :param stdout: where the image whose output is ``-`` goes (a pipe to QEMU's ``-incoming``):
        its source writes the artifact there while the image is rebuilt, and its end only once
        every image is verified and every other output is in place.
    :param on_committed: called once the file outputs are in place, before the end of the
        ``stdout`` artifact is written (a server starts the VM that opens the disks then).
    :param on_outputs: called before the first frame is read with the open descriptors (by image
        number) of the files that will become outputs as they are: images whose artifact is the
        image itself (a raw disk), no larger than their base. A server hands them to a VM that
        opens its disks as it starts (``-add-fd``), so that it loads its memory as the overlay
        arrives. The files get their names only at the commit; until the stream's end the VM does
        not read them. Should a source publish another file, apply fails.
    :param bases: bases already open, by the path ``config`` gives them at, opened by their
        source with the options ``config`` gives: a server holding its bases opens each once
        rather than at every overlay (a QEMU base is parsed and its RAM laid out as an image
        when it is opened). They are still proven to be the overlay's bases, only read, and left
        open; several applies may share them at once.
    """
    started = time.monotonic()
    progress = progress or NullProgress()
    with contextlib.ExitStack() as stack:
        feed = open_feed(config.overlay, stream)
        stack.callback(feed.close)
        # every output checked and its file made (proving its folder writable) before any work
        inputs = [path for path in config.input_paths() if stream is None or path != config.overlay]
        outputs = stack.enter_context(OutputSet(inputs))
        targets = [Targets.make(outputs, spec) for spec in config.images]
        streamed = _streamed_output(config, stdout)
        meta = read_overlay(feed, config, progress)
        # the plugins are loaded once the overlay's first bytes are in (a stream's frames are
        # read ahead meanwhile), and only those it names
        registry = registry or _registry_for(meta)
        decoders = Decoders.find(meta, registry)
        bases = [
            open_base(stack, registry, meta, image, spec, config, progress, (bases or {}).get(spec.base))
            for image, spec in zip(meta.images, config.images, strict=True)
        ]
        early = _early_outputs(meta, bases, config, targets) if on_outputs is not None else {}
        if on_outputs is not None:
            on_outputs(early)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="vmdelta"))
        rebuilder = ImageRebuilder(feed, meta, decoders, bases, [t.scratch.fd for t in targets], pool)
        ahead = [number for number in range(1, len(targets)) if number != streamed]
        copies = _BaseCopies(
            {number: _base_copy(number, rebuilder, targets[number], number in early) for number in ahead}
        )
        stack.callback(copies.close)  # stopped and finished before any scratch file is dropped
        gate = None if streamed is None else StreamedArtifact(stdout, meta.images[streamed].name)  # type: ignore[arg-type]
        gates = {} if gate is None else {streamed: gate}
        for number in _written_as_rebuilt(meta, registry, config, bases, streamed, early):
            # the artifact written into its file while its image is rebuilt, rather than after
            # every image (and read back for its digest): its end, as for standard output, once
            # every image is verified
            out = stack.enter_context(open(targets[number].output.path, "wb"))
            stack.enter_context(outputs.writing_back(targets[number].output))
            mismatch = f"rebuilt artifact {config.images[number].output} differs from the one the overlay was made from"
            gates[number] = StreamedArtifact(out, meta.images[number].name, mismatch)
        try:
            applied = []
            for number, spec in enumerate(config.images):
                # a file that is its output as it is rebuilt goes to disk as it is written, so
                # that the commit, which the VM waits for, has little left to flush
                writing = outputs.writing_back(targets[number].scratch) if number in early else contextlib.nullcontext()
                with writing:
                    applied.append(
                        _apply(
                            number,
                            rebuilder,
                            targets[number],
                            spec,
                            progress,
                            registry,
                            gates.get(number),
                            copies,
                        )
                    )
            # a stream is trusted as a whole only now; then every image is checked against its
            # digest, and only once every one verified is anything materialized
            meta = finish_overlay(feed, meta, config)
            rebuilt = [
                _verified(meta.images[number], done, spec, progress)
                for number, (done, spec) in enumerate(zip(applied, config.images, strict=True))
            ]
            reports = [
                _streamed_report(done, gate)
                if number == streamed
                else _ended(registry, done, spec, gates[number], outputs)
                if number in gates
                else _materialize(registry, done, spec, outputs)
                for number, (done, spec) in enumerate(zip(rebuilt, config.images, strict=True))
            ]
            for number, fd in early.items():
                if targets[number].output.fd != fd:
                    raise PluginError(
                        f"the {meta.images[number].source} source wrote {config.images[number].output} anew "
                        "instead of publishing the file its image was rebuilt in, which was handed out early"
                    )
            outputs.commit()
            if on_committed is not None:
                on_committed()
            if gate is not None:  # the other outputs are in place: the streamed artifact may end
                gate.release(meta.images[streamed].artifact_digest)  # type: ignore[index]
                gate.join()
        except BaseException as exc:
            for failed in gates.values():
                failed.fail(exc)
                with contextlib.suppress(BaseException):
                    failed.join()
            if isinstance(exc, OSError):
                raise outputs.explain(exc, ", ".join(str(spec.output) for spec in config.images)) from None
            raise
    return ApplyReport(overlay=config.overlay, seconds=time.monotonic() - started, images=tuple(reports))


def _early_outputs(
    meta: OverlayMetadata, bases: list[SourceImage], config: ApplyConfig, targets: list[Targets]
) -> dict[int, int]:
    """The images rebuilt, byte for byte, in the very file that becomes their output: their
    source maps the artifact itself as the image (no envelope) and writes the same format, and
    they are no larger than their base. Each file gets its final size now, as a VM sees it."""
    early = {}
    for number, (image, base, spec, files) in enumerate(zip(meta.images, bases, config.images, targets, strict=True)):
        if (
            spec.output == STDOUT
            or spec.output_format
            or image.source != image.base_source
            or base.file is None
            or base.envelope
            or image.size > base.size
        ):
            continue
        os.ftruncate(files.scratch.fd, image.size)
        early[number] = files.scratch.fd
    return early


def _registry_for(meta: OverlayMetadata) -> Registry:
    """The plugins of the distributions the overlay's components name, and the builtins. Should
    they fall short (a component now in another distribution), every installed plugin: its
    errors name what is missing, disabled or to install."""
    registry = registry_of({component.distribution for component in meta.components})
    try:
        Decoders.find(meta, registry)
        for image in meta.images:
            registry.source(image.source)
            registry.source(image.base_source)
    except PluginError:
        return default_registry()
    return registry


@attrs.frozen
class Targets:
    """One image's files: the artifact, its side files, and the scratch file the image is
    rebuilt in, all pending in one :class:`OutputSet`."""

    output: PendingFile
    sides: dict[str, PendingFile]
    scratch: PendingFile

    @classmethod
    def make(cls, outputs: OutputSet, spec: ApplyImageSpec) -> Targets:
        if spec.output == STDOUT:  # written to a pipe, not a file: only the image has a file
            return cls(None, {}, outputs.scratch(Path.cwd() / "stream"))  # type: ignore[arg-type]
        output = outputs.add(spec.output)
        sides = {name: outputs.add(path) for name, path in spec.output_sides.items()}
        return cls(output, sides, outputs.scratch(spec.output))

    def adopt(self, path: Path) -> None:
        """``RebuiltImage.move_to``: the scratch file becomes the output it names."""
        for pending in (self.output, *self.sides.values()):
            if Path(path) == pending.path:
                pending.take(self.scratch)
                return
        raise PluginError(f"a source moved the rebuilt image to {path}, which is not an output it was given")


def _base_copy(
    number: int, rebuilder: ImageRebuilder, files: Targets, is_output: bool
) -> Callable[[threading.Event], None]:
    """The copy of image ``number``'s base into its scratch file, to run ahead of its turn; a
    scratch file that ``is_output`` starts on its way to disk as soon as it is copied."""
    image, base, feed = rebuilder.meta.images[number], rebuilder.bases[number], rebuilder.feed

    def copy(stop: threading.Event) -> None:
        if not feed.partial:
            check_claimed_size(feed.reach(number), image, base)
        copy_base(base, files.scratch.fd, image.size, rebuilder.meta.unit_size, lambda n: None, stop=stop)
        if is_output:
            start_writeback(files.scratch.fd)

    return copy


class _BaseCopies:
    """The bases of the images after the first, copied into their scratch files one after the
    other in a thread of their own while the first image's frames are applied (an image's items
    read other images only once those are rebuilt, never their scratch files before). The copy
    of an image that fails raises when its turn comes; :meth:`close` stops the thread between
    two pieces and waits for it."""

    def __init__(self, jobs: dict[int, Callable[[threading.Event], None]]) -> None:
        self._jobs = jobs
        self._done = {number: threading.Event() for number in jobs}
        self._errors: dict[int, BaseException] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmdelta-copy-bases", daemon=True)
        if jobs:
            self._thread.start()

    def _run(self) -> None:
        for number, job in self._jobs.items():
            try:
                if not self._stop.is_set():
                    job(self._stop)
            except BaseException as exc:  # raised in the thread whose image it is
                self._errors[number] = exc
            finally:
                self._done[number].set()

    def wait(self, number: int) -> bool:
        """Whether image ``number``'s base was copied here (waiting for it), else it is not."""
        if number not in self._jobs:
            return False
        self._done[number].wait()
        if number in self._errors:
            raise self._errors.pop(number)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@attrs.frozen
class _Rebuilt:
    """An image rebuilt and verified, waiting for every other one before it is materialized."""

    image: ImageRecord
    rebuilt: RebuiltImage
    files: Targets
    digest: str


def _apply(
    number: int,
    rebuilder: ImageRebuilder,
    files: Targets,
    spec: ApplyImageSpec,
    progress: Progress,
    registry: Registry,
    gate: StreamedArtifact | None,
    copies: _BaseCopies,
) -> _Rebuilt:
    """Image ``number`` rebuilt in its scratch file from its base and its frames; with ``gate``,
    its artifact written out as the image becomes final."""
    image = rebuilder.meta.images[number]
    base: SourceImage = rebuilder.bases[number]
    unit = rebuilder.meta.unit_size
    feed = rebuilder.feed
    if not copies.wait(number):
        if not feed.partial:  # a file's index tells how far the items reach before any is read
            check_claimed_size(feed.reach(number), image, base)
        advance = progress.start(f"copy base {spec.base.name}", image.size)
        copy_base(base, files.scratch.fd, image.size, unit, advance, pool=rebuilder.pool)

    def rebuilt(changed: np.ndarray, envelope: bytes) -> RebuiltImage:
        return RebuiltImage(
            path=files.scratch.path,
            size=image.size,
            unit_size=unit,
            envelope=envelope,
            layout=image.layout,
            changed=changed,
            base=base,
            base_path=spec.base,
            options={
                **dict(spec.output_options),
                **({"output_format": spec.output_format} if spec.output_format else {}),
            },
            side_outputs={name: side.path for name, side in files.sides.items()},
            adopt=files.adopt,
        )

    early = None
    if gate is not None and image.size <= base.size:
        # the envelope comes before the items (as create writes it): the artifact can start now
        frame = feed.envelope(number)
        if frame is not None:
            early = _decompressed(frame, number, base.envelope)
            os.ftruncate(files.scratch.fd, image.size)
            gate.start(registry.source(image.source), rebuilt(np.zeros(0, np.int64), early))
    changed = rebuilder.apply_items(number, progress, on_final=gate.advance if early is not None else None)
    check_claimed_size(feed.reach(number), image, base)
    os.ftruncate(files.scratch.fd, image.size)
    envelope = early if early is not None else _envelope(feed, number, base.envelope)
    if gate is not None:
        if early is None:
            gate.start(registry.source(image.source), rebuilt(changed, envelope))
        gate.advance(image.size)
    return _Rebuilt(image, rebuilt(changed, envelope), files, "")


def _verified(image: ImageRecord, done: _Rebuilt, spec: ApplyImageSpec, progress: Progress) -> _Rebuilt:
    """``done``, its image checked against the digest the (now whole) metadata records."""
    digest = verify_rebuilt(image, done.files.scratch.path, spec.output_format, progress)
    return attrs.evolve(done, image=image, digest=digest)


def _materialize(registry: Registry, done: _Rebuilt, spec: ApplyImageSpec, outputs: OutputSet) -> RebuiltReport:
    """The artifact written by its source into its pending file, checked when it is meant to be
    the original byte for byte, then flushed to disk in the background while the next one is
    made (the commit waits for it)."""
    image, files = done.image, done.files
    with outputs.writing_back(files.output):
        registry.source(image.source).materialize(done.rebuilt, files.output.path)
    identical = False
    if image.artifact_digest and not spec.output_format:
        if own_file_digest(files.output.path, digest_kind(image.artifact_digest)) != image.artifact_digest:
            raise IntegrityError(f"rebuilt artifact {spec.output} differs from the one the overlay was made from")
        identical = True
    for pending in (files.output, *files.sides.values()):
        outputs.flush_early(pending)
    artifact = image.artifact_digest if identical else None
    return RebuiltReport(
        image.name, image.kind, spec.output, image.size, done.digest, identical, image.dropped, artifact
    )


def _envelope(feed: FileFeed | StreamFeed, number: int, base_envelope: bytes) -> bytes:
    return _decompressed(feed.envelope(number), number, base_envelope)


def _decompressed(frame: tuple[FrameEntry, bytes] | None, number: int, base_envelope: bytes) -> bytes:
    if frame is None:
        return b""
    entry, stored = frame
    return decompress_envelope(stored, entry.length, base_envelope, f"image {number}")


#: the output that is not a file but the ``stdout`` apply is given
STDOUT = Path("-")


def _streamed_output(config: ApplyConfig, stdout: BinaryIO | None) -> int | None:
    """The number of the image written to ``stdout``, if any (at most one)."""
    numbers = [number for number, spec in enumerate(config.images) if spec.output == STDOUT]
    if len(numbers) > 1:
        raise ConfigError("only one image can be written to standard output")
    if numbers and stdout is None:
        raise ConfigError("an output named - needs standard output to write to")
    if numbers and config.images[numbers[0]].output_sides:
        raise ConfigError("an image written to standard output has no side files")
    return numbers[0] if numbers else None


def _written_as_rebuilt(
    meta: OverlayMetadata,
    registry: Registry,
    config: ApplyConfig,
    bases: list[SourceImage],
    streamed: int | None,
    early: Mapping[int, int],
) -> list[int]:
    """The images whose artifact is more than the image (an envelope around it: a memory
    snapshot's stream) and which their source can write front to back (``stream_artifact``)
    into a file of its own: no side files, no other output format. An artifact that is the
    image itself is published as the file it was rebuilt in, which costs nothing."""
    return [
        number
        for number, (image, spec, base) in enumerate(zip(meta.images, config.images, bases, strict=True))
        if number != streamed
        and number not in early
        and base.envelope
        and not (spec.output_sides or spec.base_sides or spec.output_format)
        and hasattr(registry.source(image.source), "stream_artifact")
    ]


def _ended(
    registry: Registry, done: _Rebuilt, spec: ApplyImageSpec, gate: StreamedArtifact, outputs: OutputSet
) -> RebuiltReport:
    """The artifact written into its file as its image was rebuilt, ended now that every image
    is verified: its digest checked against what was written, then flushed in the background.
    One its source cannot write front to back (a mapped-ram snapshot) is made as usual."""
    image = done.image
    gate.release(image.artifact_digest)
    try:
        gate.join()
    except ConfigError:
        if gate.size:
            raise
        return _materialize(registry, done, spec, outputs)
    outputs.flush_early(done.files.output)
    identical = bool(image.artifact_digest)
    artifact = image.artifact_digest if identical else None
    return RebuiltReport(
        image.name, image.kind, spec.output, image.size, done.digest, identical, image.dropped, artifact
    )


def _streamed_report(done: _Rebuilt, gate: StreamedArtifact | None) -> RebuiltReport:
    """What the report says of the image written to standard output (its end still withheld)."""
    image = done.image
    identical = bool(image.artifact_digest)  # checked against what is written before the end goes
    return RebuiltReport(
        image.name, image.kind, STDOUT, image.size, done.digest, identical, image.dropped, image.artifact_digest
    )
