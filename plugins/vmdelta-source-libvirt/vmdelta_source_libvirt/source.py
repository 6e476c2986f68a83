"""The ``libvirt`` source: save images written by ``virsh save`` and managed save.

The memory image is the QEMU stream's, read by the ``qemu`` source's public API
(:mod:`vmdelta_source_qemu.embedded`); the header and the domain XML are the envelope. A
compressed stream is decompressed into an unlinked temporary file first, and written back by
compressing the rebuilt stream with the program libvirt used.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from vmdelta_source_qemu import open_stream, ram_limit, write_stream

from vmdelta_core.plugin import ConfigError, ImageKind, RebuiltImage, Source, SourceImage, StorageError
from vmdelta_source_libvirt.compression import Program, program_for, recompresses_identically, varying_head
from vmdelta_source_libvirt.envelope import pack_envelope, unpack_envelope
from vmdelta_source_libvirt.header import SaveHeader, parse_prefix, read_prefix

__all__ = ["LibvirtSource"]


def _stream_limit(max_ram: int) -> int:
    """The most a compressed stream may decompress to: its RAM, 8 bytes of record header per
    4 KiB page (1/512), device state and the VM description, with room to spare."""
    return max_ram + max_ram // 64 + (16 << 20)


class LibvirtSource(Source):
    """libvirt save images (``virsh save``, managed save): the QEMU stream after the header and
    domain XML, raw or compressed (gzip, bzip2, xz, lzop, zstd). Options: ``tmpdir`` (where the
    image file and a decompressed stream go), ``max_ram`` (the most RAM the stream may claim, in
    bytes; default 1 TiB)."""

    name = "libvirt"
    kinds = frozenset({"memory"})
    option_names = frozenset({"tmpdir", "max_ram"})

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        if kind != "memory":
            raise ConfigError(f"the libvirt source reads memory images, not {kind} images")
        path = Path(path)
        with _opened(path) as fd:
            prefix = read_prefix(fd, os.fstat(fd).st_size, str(path))
            header = parse_prefix(prefix, str(path))
            stream_options = {k: options[k] for k in ("tmpdir", "max_ram") if k in options}
            if header.compression == "raw":
                image = open_stream(path, start=header.stream_offset, options=stream_options, kind=kind)
                head, identical, tool = b"", True, None
            else:
                image, head, identical, tool = _open_compressed(fd, header, stream_options, kind)
        image.envelope = pack_envelope(prefix, head, image.envelope)
        image.exact_artifact = image.exact_artifact and identical
        image.layout = {**image.layout, "libvirt": {**header.summary(), "compressor": tool}}
        return image

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        envelope = unpack_envelope(rebuilt.envelope)
        compression = envelope.header.compression
        program = None if compression == "raw" else program_for(compression)
        with open(output, "w+b") as out:
            out.write(envelope.prefix)
            if program is None:
                write_stream(envelope.stream, Path(rebuilt.path), rebuilt.size, out)
                return
            with _scratch(rebuilt.options.get("tmpdir")) as stream:
                write_stream(envelope.stream, Path(rebuilt.path), rebuilt.size, stream)
                stream.flush()
                program.compress(stream.fileno(), out, envelope.head)


def _open_compressed(
    fd: int, header: SaveHeader, options: Mapping[str, Any], kind: ImageKind
) -> tuple[SourceImage, bytes, bool, str]:
    """Decompress the stream into an unlinked file and read it; the head its program writes
    differently each run; whether compressing it again gives the image's bytes (then the
    rebuilt image is the same file)."""
    program = program_for(header.compression)
    head = os.pread(fd, 1024, header.stream_offset)
    head = head[: varying_head(program.name, head)]
    limit = _stream_limit(ram_limit(options))
    with _scratch(options.get("tmpdir")) as stream:
        program.decompress(fd, header.stream_offset, stream, limit)
        # the unlinked file is reached through /proc: open_stream maps it by path
        image = open_stream(Path(f"/proc/self/fd/{stream.fileno()}"), options=options, kind=kind)
        try:
            identical = recompresses_identically(program, stream.fileno(), fd, header.stream_offset, head)
        except BaseException:
            image.close()
            raise
    return image, head, identical, _describe(program)


def _describe(program: Program) -> str:
    return f"{' '.join([program.name, *program.compress_args[1:]])} ({program.version()})"


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _scratch(tmpdir: str | None) -> Iterator[BinaryIO]:
    """An unlinked read-write file for a decompressed stream, in ``tmpdir`` or the system's
    temporary folder."""
    try:
        f = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        folder = tmpdir or tempfile.gettempdir()
        raise StorageError(f"cannot make a temporary file in {folder}: {exc.strerror}") from None
    with f:
        yield f  # type: ignore[misc]
