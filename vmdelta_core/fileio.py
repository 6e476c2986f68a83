"""Files as the pipeline needs them: read-only maps, sparse extents, kernel copies, holes.

Outputs are written through :mod:`vmdelta_core.outputs`."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmdelta_core.components import SourceImage
from vmdelta_core.errors import ConfigError

__all__ = [
    "check_input",
    "copy_range",
    "data_extents",
    "describe_file_type",
    "hole_extents",
    "map_readonly",
    "open_file_image",
    "open_regular",
    "punch_zero_runs",
    "write_pieces",
]

_CHUNK = 16 << 20

_FILE_TYPES = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_file_type(mode: int) -> str:
    """What a file that is not a regular one is, in words (``a FIFO``, ``a block device``...)."""
    return next((words for test, words in _FILE_TYPES if test(mode)), "not a regular file")


def open_regular(path: Path | str, what: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    Opened without blocking and checked with ``fstat``, so that a FIFO costs nothing (``open``
    would block on it for ever) and the check looks at the very file opened. ``what`` names the
    file in messages (``"overlay"``, ``"base disk"``).

    :raises ConfigError: the file is missing, or is a FIFO, a device, a folder or a socket.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if stat.S_ISREG(mode):
            raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
        raise ConfigError(f"{what} {path} is {describe_file_type(mode)}; vmdelta reads only regular files") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError(f"{what} {path} is {describe_file_type(mode)}; vmdelta reads only regular files")
    os.set_blocking(fd, True)
    return fd


def check_input(path: Path | str, what: str) -> None:
    """Refuse an input that is missing or is not a regular file (see :func:`open_regular`)."""
    os.close(open_regular(path, what))


def map_readonly(path: Path) -> tuple[np.ndarray, list[object]]:
    """The whole file as a read-only ``uint8`` array, and what to close when done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return np.zeros(0, dtype=np.uint8), []
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except OSError as exc:
        raise ConfigError(f"cannot map {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    with contextlib.suppress(AttributeError, OSError):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(mapped, dtype=np.uint8), [mapped]


def open_file_image(path: Path, kind: str, **fields: Any) -> SourceImage:
    """A file whose bytes are the image: mapped read-only, with its holes and its file named."""
    data, closers = map_readonly(path)
    mapping = closers[0] if closers else None
    return SourceImage(
        kind=kind,
        data=data,
        holes=hole_extents(path),
        file=Path(path),
        mapping=mapping,  # type: ignore[arg-type]
        closers=closers,
        **fields,
    )


def copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` from one file to the same place in another, in the
    kernel (``copy_file_range``: a reflink or server-side copy where the file system can)."""
    end = offset + length
    while offset < end:
        try:
            done = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            done = 0
        if done == 0:  # not supported here, or the source ended early: plain copy
            while offset < end:
                chunk = os.pread(src, min(end - offset, 8 << 20), offset)
                if not chunk:
                    raise OSError(errno.EIO, "source file ended early")
                os.pwrite(dst, chunk, offset)
                offset += len(chunk)
            return
        offset += done


def data_extents(path: Path, start: int = 0, end: int | None = None) -> np.ndarray:
    """Byte ranges ``(start, length)`` that hold data, found with SEEK_DATA/SEEK_HOLE.

    On a file system without sparse support the whole file is one data extent.
    """
    out: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size if end is None else end
        pos = start
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                out = [(start, size - start)]
                break
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            out.append((data, hole - data))
            pos = hole
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def hole_extents(path: Path) -> np.ndarray:
    """Byte ranges ``(start, length)`` that are holes (read as zeros) in ``path``."""
    size = os.stat(path).st_size
    data = data_extents(path)
    holes: list[tuple[int, int]] = []
    pos = 0
    for start, length in data.tolist():
        if start > pos:
            holes.append((pos, start - pos))
        pos = start + length
    if pos < size:
        holes.append((pos, size - pos))
    return np.array(holes, dtype=np.int64).reshape(-1, 2)


#: buffers one ``pwritev`` takes at most (the kernel's ``IOV_MAX``)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def write_pieces(fd: int, offset: int, pieces: Sequence[Any]) -> None:
    """Write the buffers ``pieces`` one after the other from ``offset``: one ``pwritev`` for up
    to ``IOV_MAX`` of them, so a run of units costs one system call, not one per unit."""
    at = 0
    while at < len(pieces):
        batch = pieces[at : at + _IOV_MAX]
        done = os.pwritev(fd, batch, offset)
        want = sum(memoryview(piece).nbytes for piece in batch)
        if done < want:  # a short write (a signal, a nearly full disk): finish piece by piece
            for piece in batch:
                view = memoryview(piece).cast("B")
                skip = min(done, view.nbytes)
                done -= skip
                offset += skip
                while skip < view.nbytes:
                    wrote = os.pwrite(fd, view[skip:], offset)
                    skip += wrote
                    offset += wrote
        else:
            offset += done
        at += len(batch)


def punch_zero_runs(fd: int, start: int, data: np.ndarray, unit: int) -> None:
    """Write ``data`` at ``start``, leaving holes where whole units are zero."""
    n = data.shape[0] // unit
    if n:
        units = data[: n * unit].reshape(n, unit)
        nonzero = units.view(np.uint64).any(axis=1) if unit % 8 == 0 else units.any(axis=1)
    else:
        nonzero = np.zeros(0, dtype=bool)
    # runs of units with data
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nonzero, [False])).astype(np.int8)))
    for run_start, run_end in edges.reshape(-1, 2).tolist():
        os.pwrite(fd, data[run_start * unit : run_end * unit], start + run_start * unit)
    tail = data[n * unit :]
    if tail.shape[0] and tail.any():
        os.pwrite(fd, tail, start + n * unit)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_fallocate = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``length`` bytes at ``offset`` read as zeros, freeing their blocks where the file
    system can (falls back to writing zeros)."""
    global _fallocate
    if _fallocate is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            func = libc.fallocate
            func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            func.restype = ctypes.c_int
            _fallocate = func
        except (OSError, AttributeError):
            _fallocate = False
    if _fallocate and _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    zeros = bytes(min(length, 1 << 20))
    while length:
        step = min(length, len(zeros))
        os.pwrite(fd, zeros[:step], offset)
        offset += step
        length -= step
