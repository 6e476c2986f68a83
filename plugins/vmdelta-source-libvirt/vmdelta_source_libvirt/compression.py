"""The compressed formats of a save image, through the programs libvirt itself runs.

libvirt pipes QEMU's stream through ``PROGRAM -c`` (``xz -c -3``) when it saves and through
``PROGRAM -dc`` (``lzop -dc --ignore-warn``) when it restores (libvirt 9.0.0,
``src/qemu/qemu_saveimage.c``). The same programs read the image here, so whatever libvirt
can restore reads, and they write it back: with the same program and version the compressed
bytes come out identical. The stream reaches them through a pipe, as under libvirt: given a
regular file as standard input, gzip and lzop would record its time and mode. lzop records the
time it ran even so: its file header (:func:`varying_head`) is kept from the image and put back
over the one it writes. Whether the bytes come out identical for a given image is checked when
it is read (:func:`recompresses_identically`).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, BinaryIO

import attrs

from vmdelta_core.plugin import ConfigError, FormatError, StorageError

__all__ = ["Program", "program_for", "recompresses_identically", "varying_head"]

_CHUNK = 1 << 20

#: Debian package of each program, for the message when it is missing
_PACKAGES = {"gzip": "gzip", "bzip2": "bzip2", "xz": "xz-utils", "lzop": "lzop", "zstd": "zstd"}


@attrs.frozen
class Program:
    """A compression program as libvirt runs it."""

    name: str
    path: str

    @property
    def compress_args(self) -> list[str]:
        return [self.path, "-c", "-3"] if self.name == "xz" else [self.path, "-c"]

    @property
    def decompress_args(self) -> list[str]:
        return [self.path, "-dc", "--ignore-warn"] if self.name == "lzop" else [self.path, "-dc"]

    def version(self) -> str:
        """The program's first ``--version`` line, recorded in the layout."""
        done = subprocess.run([self.path, "--version"], capture_output=True, text=True, check=False)
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else self.name

    def decompress(self, source: int, start: int, out: BinaryIO, limit: int) -> None:
        """Decompress file ``source`` from byte ``start`` to its end into ``out``, at most
        ``limit`` bytes: the kernel stops the program at the limit (``RLIMIT_FSIZE``, set
        before it gets its first byte of input), so a small image that claims to hold a huge
        stream costs nothing but the limit."""
        with subprocess.Popen(self.decompress_args, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE) as proc:
            assert proc.stdin is not None and proc.stderr is not None
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
            pump = threading.Thread(target=_pump, args=(source, proc.stdin, start), daemon=True)
            pump.start()
            err = proc.stderr.read()
            proc.wait()
            pump.join()
        if proc.returncode == -signal.SIGXFSZ or (proc.returncode and os.fstat(out.fileno()).st_size >= limit):
            raise FormatError(
                f"the {self.name} stream decompresses to more than {limit} bytes; if the VM has that much RAM, "
                "raise the libvirt source's max_ram option"
            )
        if proc.returncode:
            raise FormatError(f"the {self.name} stream does not decompress: {_last_line(err, self.name)}")

    def compress(self, source: int, out: BinaryIO, head: bytes = b"") -> None:
        """Compress file ``source`` (from its start) onto ``out`` at its position; ``head``
        (from :func:`varying_head`) replaces the header the program writes, if it is as long."""
        out.flush()
        at = out.tell()
        with self._compressing(source, out) as proc:
            assert proc.stderr is not None
            proc.wait()
            err = proc.stderr.read()
        if proc.returncode:
            raise StorageError(f"{self.name} -c failed: {_last_line(err, self.name)}")
        if head and varying_head(self.name, os.pread(out.fileno(), _HEAD_MAX, at)) == len(head):
            os.pwrite(out.fileno(), head, at)

    @contextmanager
    def _compressing(self, source: int, out: BinaryIO | int) -> Iterator[subprocess.Popen[bytes]]:
        """The program compressing file ``source``, fed through a pipe, writing to ``out``."""
        with subprocess.Popen(self.compress_args, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE) as proc:
            assert proc.stdin is not None
            pump = threading.Thread(target=_pump, args=(source, proc.stdin), daemon=True)
            pump.start()
            try:
                yield proc
            finally:
                if proc.poll() is None and pump.is_alive():
                    proc.kill()
                pump.join()


def _pump(source: int, pipe: IO[bytes], offset: int = 0) -> None:
    """Copy file ``source`` from ``offset`` to its end into ``pipe``, then close it (the
    program's end of input); a program that stopped reading ends the copy."""
    try:
        while sent := os.sendfile(pipe.fileno(), source, offset, _CHUNK):
            offset += sent
    except OSError:  # a broken pipe: the program stopped reading
        pass
    finally:
        with suppress(OSError):
            pipe.close()


def program_for(compression: str) -> Program:
    """The program of a compressed format, or a ``ConfigError`` naming what to install."""
    path = shutil.which(compression)
    if path is None:
        raise ConfigError(
            f"the save image is {compression}-compressed: install {compression} "
            f"(Debian package {_PACKAGES.get(compression, compression)}), as libvirt needs it to restore the image too"
        )
    return Program(compression, path)


def recompresses_identically(program: Program, stream: int, image: int, start: int, head: bytes = b"") -> bool:
    """Whether compressing the decompressed stream (file ``stream``) gives exactly the bytes of
    file ``image`` from ``start`` to its end, ``head`` put over the program's header as
    :meth:`Program.compress` does; compared as the program writes, stopped at the first
    difference."""
    size = os.fstat(image).st_size
    with program._compressing(stream, subprocess.PIPE) as proc:
        assert proc.stdout is not None
        pos = start
        same = True
        while same:
            chunk = proc.stdout.read(_CHUNK)
            if not chunk:
                break
            if pos == start and head and varying_head(program.name, chunk) == len(head):
                chunk = head + chunk[len(head) :]
            same = os.pread(image, len(chunk), pos) == chunk
            pos += len(chunk)
        if not same:
            proc.kill()
        proc.stdout.close()
        code = proc.wait()
    return same and code == 0 and pos == size


_LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
_HEAD_MAX = 1024
_LZOP_FILTER, _LZOP_EXTRA = 0x800, 0x40


def varying_head(program: str, data: bytes) -> int:
    """How many leading bytes of a compressed stream ``program`` writes differently each time
    it runs: lzop's file header, which holds the time (lzop 1.04, ``lzop.c``: magic, version,
    library version, version needed, method, level, flags, filter, mode, mtime low and high,
    name, header checksum, extra field); 0 for the others, or for bytes that are not such a
    header."""
    if program != "lzop" or not data.startswith(_LZOP_MAGIC):
        return 0
    pos = len(_LZOP_MAGIC)

    def u(n: int) -> int:
        nonlocal pos
        value = int.from_bytes(data[pos : pos + n], "big")
        pos += n
        return value

    version = u(2)
    new = version >= 0x0940
    pos += 2 + (2 if new else 0) + 1 + (1 if new else 0)  # library version, needed, method, level
    flags = u(4)
    pos += (4 if flags & _LZOP_FILTER else 0) + 4 + 4 + (4 if new else 0)  # filter, mode, mtime
    pos += 1 + u(1) + 4  # name, header checksum
    if flags & _LZOP_EXTRA:
        pos += u(4) + 4
    return pos if pos <= min(len(data), _HEAD_MAX) else 0


def _last_line(stderr: bytes, name: str) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"{name} exited with an error"
