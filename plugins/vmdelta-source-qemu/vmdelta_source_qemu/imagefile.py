"""The memory image while it is built: an unlinked sparse temporary file, mapped read-only when done.

An image is as large as the guest's RAM. Held in an anonymous buffer, every page with data stays
in the process's memory until the image is closed; written into a file with ``pwrite``, pages go
to the page cache, and the read-only map handed to the core drops what the core has finished
reading (``SourceImage.release``). Pages never written stay holes and cost nothing, in the file
and here: nothing is kept per page of the image, so a snapshot that claims far more RAM than it
holds costs what it holds. Pages are gathered from the snapshot a bounded chunk at a time, so the
writer never holds more than one chunk, and it tells per page written whether it holds data while
the chunk is at hand (the envelope needs that, and the image is then not read a second time).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import tempfile
from typing import Any

import numpy as np

from vmdelta_core.plugin import StorageError
from vmdelta_source_qemu.c_migration import PAGE_SIZE

__all__ = ["CHUNK_PAGES", "ImageFile", "page_nonzero"]

#: pages gathered, checked and written at a time (4 MiB; also Linux's IOV_MAX)
CHUNK_PAGES = 1 << 10
_HEAD = 64
_pwritev: Any = None
_mmap: Any = None
_MAP_FIXED = 0x10


def _libc_pwritev() -> Any:
    """libc's ``pwritev``, to write strided pages without gathering them first (``os.pwritev``
    wants one Python buffer per page); ``False`` where it cannot be had."""
    global _pwritev
    if _pwritev is None:
        try:
            func = ctypes.CDLL(None, use_errno=True).pwritev
            func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
            func.restype = ctypes.c_ssize_t
            _pwritev = func
        except (OSError, AttributeError):
            _pwritev = False
    return _pwritev


def _libc_mmap() -> Any:
    """libc's ``mmap``, to map a file at a chosen address (Python's cannot); ``False`` where it
    cannot be had."""
    global _mmap
    if _mmap is None:
        try:
            func = ctypes.CDLL(None, use_errno=True).mmap
            func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
            func.restype = ctypes.c_void_p
            _mmap = func
        except (OSError, AttributeError):
            _mmap = False
    return _mmap


def page_nonzero(pages: np.ndarray) -> np.ndarray:
    """One bool per row of a ``(n, PAGE_SIZE)`` array (any strides): does the page hold a non-zero
    byte. A page with data nearly always has some in its first bytes, so those are looked at
    first and only the rest of the pages that start with zeros is read."""
    out = pages[:, :_HEAD].any(axis=1)
    rest = np.flatnonzero(~out)
    if rest.shape[0]:
        out[rest] = pages[rest].any(axis=1)
    return out


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class ImageFile:
    """A memory image of ``size`` bytes under construction in ``folder`` (default: the system's
    temporary folder), sparse: only the pages written take room."""

    def __init__(self, size: int, folder: str | os.PathLike[str] | None = None) -> None:
        self.size = size
        self._file = tempfile.TemporaryFile(dir=folder, prefix="vmdelta-qemu-")  # noqa: SIM115 - closed by close()
        self.fd = self._file.fileno()
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self._file.close()
            where = folder or tempfile.gettempdir()
            raise StorageError(f"cannot make a {size}-byte sparse image file in {where}: {exc.strerror}") from None
        self._scratch = np.empty((0, PAGE_SIZE), np.uint8)
        self._overlays: list[tuple[int, int, int, np.ndarray]] = []

    def write_pages(self, first_page: int, pages: np.ndarray) -> np.ndarray:
        """Write ``pages`` (``(n, PAGE_SIZE)``, any row stride, e.g. the pages of a run of records
        in a stream) at page ``first_page`` of the image, a chunk at a time; returns whether each
        holds a non-zero byte."""
        n = pages.shape[0]
        nonzero = np.empty(n, bool)
        for a in range(0, n, CHUNK_PAGES):
            b = min(a + CHUNK_PAGES, n)
            chunk = pages[a:b]
            nonzero[a:b] = page_nonzero(chunk)
            offset = (first_page + a) * PAGE_SIZE
            if chunk.flags.c_contiguous:
                pwrite_all(self.fd, chunk, offset)
            elif not self._write_strided(chunk, offset):
                if self._scratch.shape[0] < b - a:
                    self._scratch = np.empty((CHUNK_PAGES, PAGE_SIZE), np.uint8)
                gathered = self._scratch[: b - a]
                gathered[:] = chunk
                pwrite_all(self.fd, gathered, offset)
        return nonzero

    def _write_strided(self, pages: np.ndarray, offset: int) -> bool:
        """One ``pwritev`` of rows that each are contiguous: the kernel gathers them. False when
        it could not write them all (the caller writes them another way)."""
        pwritev = _libc_pwritev()
        if not pwritev or pages.strides[1] != 1:
            return False
        n = pages.shape[0]
        iov = np.empty((n, 2), np.uint64)
        iov[:, 0] = pages.__array_interface__["data"][0] + np.arange(n, dtype=np.uint64) * np.uint64(pages.strides[0])
        iov[:, 1] = PAGE_SIZE
        return int(pwritev(self.fd, iov.ctypes.data, n, offset)) == n * PAGE_SIZE

    def fill_pages(self, image_pages: np.ndarray, fill: np.ndarray) -> None:
        """Set each page of ``image_pages`` (sorted page numbers) to its byte of ``fill``."""
        cuts = np.flatnonzero((np.diff(image_pages) != 1) | (np.diff(fill.astype(np.int16)) != 0)) + 1
        for a, b in zip(np.append(0, cuts).tolist(), np.append(cuts, image_pages.shape[0]).tolist(), strict=True):
            count = b - a
            for first in range(0, count, CHUNK_PAGES):
                k = min(CHUNK_PAGES, count - first)
                data = np.full(k * PAGE_SIZE, fill[a], np.uint8)
                pwrite_all(self.fd, data, (int(image_pages[a]) + first) * PAGE_SIZE)

    def copy_from(self, src: int, src_offset: int, offset: int, length: int) -> None:
        """Copy ``length`` bytes of file ``src`` at ``src_offset`` into the image at ``offset``, in
        the kernel where it can (``copy_file_range``; pages do not pass through this process)."""
        end = src_offset + length
        while src_offset < end:
            try:
                done = os.copy_file_range(src, self.fd, end - src_offset, src_offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                done = 0
            if done == 0:
                chunk = os.pread(src, min(end - src_offset, CHUNK_PAGES * PAGE_SIZE), src_offset)
                if not chunk:
                    raise OSError(errno.EIO, "file ended early")
                pwrite_all(self.fd, chunk, offset)
                done = len(chunk)
            src_offset += done
            offset += done

    def map_file(self, src: int, offset: int, length: int, extents: np.ndarray) -> None:
        """Make ``length`` bytes of the image at ``offset`` (a multiple of the page size) the first
        ``length`` bytes of file ``src``, whose data ``extents`` (start, length) are given: the file
        is mapped there when the image is mapped, so its pages are neither copied nor held twice;
        where that cannot be done, its data is copied in."""
        self._overlays.append((os.dup(src), offset, length, extents))

    def finish(self) -> tuple[np.ndarray, Any]:
        """The image as a read-only array over a map of the file (with the files of
        :meth:`map_file` mapped over their ranges), and that map (``None`` for an empty image).
        The map keeps the files alive; closing it unmaps them all and frees the image file."""
        try:
            if self.size == 0:
                return np.zeros(0, np.uint8), None
            try:
                mapping = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
            except (OSError, OverflowError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise StorageError(f"cannot map the {self.size}-byte image file: {reason}") from None
            data = np.frombuffer(mapping, np.uint8)
            for src, offset, length, extents in self._overlays:
                if not _map_over(data.ctypes.data + offset, length, src):
                    for start, size in extents.tolist():
                        self.copy_from(src, start, offset + start, size)
            with contextlib.suppress(AttributeError, OSError):
                mapping.madvise(mmap.MADV_SEQUENTIAL)
            return data, mapping
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()
        while self._overlays:
            os.close(self._overlays.pop()[0])


def _map_over(address: int, length: int, fd: int) -> bool:
    """Map ``fd`` from its start read-only and shared at ``address`` (inside a map this process
    owns, which unmaps it when it is closed); False where it cannot be done."""
    libc_mmap = _libc_mmap()
    if not libc_mmap or length == 0:
        return False
    got = libc_mmap(address, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    return got == address
