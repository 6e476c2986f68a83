"""Outputs that never cost the user a file: checked before work, invisible until whole, all at once.

The rules, for every file ``create`` and ``apply`` write:

* An output is never the same file as an input or as another output. Files are compared by
  identity (device and inode), so a path through a bind mount, a hard link, ``..`` or a symbolic
  link is caught as surely as the same spelling.
* An output that exists must be a regular file: a device node, a FIFO, a socket, a folder or a
  symbolic link named as an output is refused, never replaced.
* Every output's folder is proved writable before work starts, by creating the output's
  temporary file there.
* Outputs are written into files without a name (``O_TMPFILE``), so a process killed by any
  signal, ``SIGKILL`` included, leaves nothing behind; where the file system cannot make such a
  file, a hidden named temporary beside the output stands in (removed on any error or signal
  Python sees).
* Every output is flushed to disk (``fsync``) before it gets a name. An output that is complete
  early (:meth:`OutputSet.flush_early`) starts its flush in the background while the others are
  still being made; the commit waits for it, reports its failure, and flushes every file again.
* Nothing appears until every output is complete: :meth:`OutputSet.commit` first links every file
  to a hidden name beside its target (the step that can fail for want of space or permission,
  undone completely if it does), then renames each over its target. A rename within one folder
  fails only if the file system itself fails; should one fail, the outputs before it are in place,
  the rest are not, and the error names both.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vmdelta_core.errors import ConfigError, StorageError
from vmdelta_core.fileio import describe_file_type

__all__ = ["OutputSet", "PendingFile", "storage_error"]

_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
#: failures that can only come from writing
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def storage_error(exc: OSError, path: Path | str, doing: str = "writing") -> StorageError:
    """One line for an OS failure, naming the user's path (never a temporary's)."""
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EFBIG: "the file would be larger than the file system allows",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return StorageError(f"{doing} {path}: {reason}")


_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_linkat = None


def _link_fd(fd: int, name: Path) -> None:
    """Give the open file ``fd`` the name ``name``: ``linkat`` through ``/proc/self/fd`` with
    ``AT_SYMLINK_FOLLOW``, which (unlike ``AT_EMPTY_PATH``) needs no privilege. ``os.link``
    cannot do it: it links the ``/proc`` symbolic link itself."""
    global _linkat
    if _linkat is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _linkat = libc.linkat
        _linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        _linkat.restype = ctypes.c_int
    source = f"/proc/self/fd/{fd}".encode()
    if _linkat(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(name), _AT_SYMLINK_FOLLOW) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(name))


class PendingFile:
    """A new file in ``target``'s folder that has no name until its :class:`OutputSet` commits.

    ``path`` opens it (``/proc/self/fd/N`` for an unnamed file, else the hidden temporary) and
    ``fd`` is an open read-write descriptor of it.
    """

    def __init__(self, target: Path, *, suffix: str = ".part") -> None:
        self.target = Path(target)
        self.named: Path | None = None
        folder = self.target.parent
        try:
            self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE or not Path("/proc/self/fd").is_dir():
                raise storage_error(exc, self.target, "cannot write") from None
            self.fd = self._named_temporary(folder, suffix)
        else:
            if not Path(f"/proc/self/fd/{self.fd}").exists():  # no /proc: linking would fail later
                os.close(self.fd)
                self.fd = self._named_temporary(folder, suffix)

    def _named_temporary(self, folder: Path, suffix: str) -> int:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=suffix, dir=folder)
        except OSError as exc:
            raise storage_error(exc, self.target, "cannot write") from None
        os.fchmod(fd, 0o666 & ~_umask())  # as an ordinary new file would be
        self.named = Path(name)
        return fd

    @property
    def path(self) -> Path:
        return self.named if self.named is not None else Path(f"/proc/self/fd/{self.fd}")

    def take(self, other: PendingFile) -> None:
        """Become ``other``'s file (same folder): its bytes are published at this target."""
        if other.target.parent.resolve() != self.target.parent.resolve():
            raise ValueError("a pending file can only take one from the same folder")
        self.discard()
        self.fd, self.named = other.fd, other.named
        other.fd, other.named = -1, None

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.named is not None:
            with contextlib.suppress(FileNotFoundError):
                self.named.unlink()
            self.named = None

    def _link_beside(self) -> Path:
        """Give the file a hidden name beside its target (step one of publishing)."""
        if self.named is not None:
            return self.named
        for _ in range(100):
            name = self.target.parent / f".{self.target.name}.{os.urandom(6).hex()}.part"
            try:
                _link_fd(self.fd, name)
            except FileExistsError:
                continue
            self.named = name
            return name
        raise StorageError(f"cannot find a free temporary name beside {self.target}")


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def start_writeback(fd: int) -> None:
    """Have the kernel start writing ``fd``'s dirty pages to disk now, without waiting for them
    (Linux ``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``). Only a head start for the flush
    that follows: it guarantees nothing, and does nothing where the call is missing."""
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes

        try:
            func = ctypes.CDLL(None, use_errno=True).sync_file_range
            func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            func.restype = ctypes.c_int
            _sync_file_range = func
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class _Writeback:
    """:func:`start_writeback` of one file every ``interval`` seconds, in a thread of its own,
    until stopped: what a source writes reaches the disk while it is still writing."""

    def __init__(self, fd: int, interval: float) -> None:
        self._fd = os.dup(fd)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="vmdelta-writeback", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                start_writeback(self._fd)
        finally:
            os.close(self._fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Flush:
    """``fsync`` of one file in a thread of its own, through a descriptor of its own (so that the
    file may be discarded meanwhile); its failure kept for :meth:`wait`."""

    def __init__(self, fd: int) -> None:
        self._fd = os.dup(fd)
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="vmdelta-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self._fd)

    def wait(self) -> OSError | None:
        self._thread.join()
        return self.error


class OutputSet:
    """The outputs of one command: checked against its inputs, published together.

    :param inputs: every file the command reads (artifacts, side files, filter inputs, the
        overlay or pipeline); outputs may be none of them.
    """

    def __init__(self, inputs: Iterable[Path | str]) -> None:
        self._inputs: dict[tuple[int, int], Path] = {}
        for path in inputs:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                self._inputs[(st.st_dev, st.st_ino)] = Path(path)
        self._claimed: dict[tuple[int, int, str], Path] = {}
        self._claimed_files: dict[tuple[int, int], Path] = {}
        self._files: list[PendingFile] = []
        self._scratch: list[PendingFile] = []
        self._flushes: dict[int, list[_Flush]] = {}

    def check(self, target: Path | str) -> None:
        """Refuse ``target`` as an output if it is an input, a non-regular file, or named twice."""
        target = Path(target)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise storage_error(exc, target, "cannot write") from None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(
                    f"output {target} is {describe_file_type(st.st_mode)}; vmdelta writes only regular files "
                    f"and never replaces anything else"
                )
            same = self._inputs.get((st.st_dev, st.st_ino))
            if same is not None:
                what = "" if os.path.abspath(same) == os.path.abspath(target) else f" ({same})"
                raise ConfigError(f"output {target} is the same file as an input{what}; refusing to overwrite it")
        folder = target.parent
        try:
            fst = os.stat(folder)
        except FileNotFoundError:
            raise ConfigError(f"cannot write {target}: folder {folder} does not exist") from None
        except OSError as exc:
            raise storage_error(exc, target, "cannot write") from None
        if not stat.S_ISDIR(fst.st_mode):
            raise ConfigError(f"cannot write {target}: {folder} is not a folder")
        where = (fst.st_dev, fst.st_ino, target.name)
        if where in self._claimed:
            raise ConfigError(f"output {target} is named twice (also as {self._claimed[where]})")
        if st is not None:  # a hard link under another name is the same file too
            other = self._claimed_files.get((st.st_dev, st.st_ino))
            if other is not None:
                raise ConfigError(f"output {target} is the same file as output {other}")
            self._claimed_files[(st.st_dev, st.st_ino)] = target
        self._claimed[where] = target

    def add(self, target: Path | str) -> PendingFile:
        """A checked output: its pending file, made now so that an unwritable folder fails early."""
        self.check(target)
        pending = PendingFile(Path(target))
        self._files.append(pending)
        return pending

    def scratch(self, beside: Path | str, suffix: str = ".rebuilt") -> PendingFile:
        """A working file in ``beside``'s folder that is never published (unless an output takes it)."""
        pending = PendingFile(Path(beside), suffix=suffix)
        self._scratch.append(pending)
        return pending

    def user_path(self, path: Path | str | None) -> Path | str | None:
        """The user's name for a pending file's path (for messages), else ``path`` itself."""
        if path is None:
            return None
        for pending in (*self._files, *self._scratch):
            if pending.fd >= 0 and os.fspath(path) in (os.fspath(pending.path), f"/proc/self/fd/{pending.fd}"):
                return pending.target
        return path

    def explain(self, exc: OSError, default: Path | str) -> StorageError:
        """The one-line error for an OS failure while the outputs were being written: named by
        the user's path of the file it concerns, or ``default`` when the system did not say."""
        named = self.user_path(exc.filename)
        if named is not None and named != exc.filename:
            return storage_error(exc, named)
        if exc.filename and exc.errno not in _WRITE_ERRORS:
            return storage_error(exc, exc.filename, "reading")
        return storage_error(exc, default)

    def flush_early(self, pending: PendingFile) -> None:
        """Start flushing ``pending`` to disk now, in the background: its bytes are final (the
        commit flushes it again, and only then gives it a name). A file flushed while the next
        output is being made costs the commit little of its wait for the disk."""
        if pending.fd >= 0:
            self._flushes.setdefault(id(pending), []).append(_Flush(pending.fd))

    @contextlib.contextmanager
    def writing_back(self, pending: PendingFile, interval: float = 0.05) -> Iterator[None]:
        """While the block writes ``pending`` (a source making its artifact), its bytes are sent
        to disk as they come, so that its flush has little left to wait for."""
        if pending.fd < 0:
            yield
            return
        pump = _Writeback(pending.fd, interval)
        try:
            yield
        finally:
            pump.stop()

    def _early_error(self, pending: PendingFile) -> OSError | None:
        """The failure of ``pending``'s early flushes, if any (a write error is reported to the
        first ``fsync`` that sees it, which may have been one of these)."""
        errors = [flush.wait() for flush in self._flushes.pop(id(pending), [])]
        return next((error for error in errors if error is not None), None)

    def commit(self) -> None:
        """Put every output in place: all get a hidden name first, then each is renamed."""
        linked: list[PendingFile] = []
        try:
            for pending in self._files:
                try:
                    st = os.lstat(pending.target)
                except FileNotFoundError:
                    pass
                else:
                    if not stat.S_ISREG(st.st_mode):  # it changed while we worked: still never replace it
                        raise ConfigError(f"output {pending.target} became {describe_file_type(st.st_mode)}")
                try:
                    early = self._early_error(pending)
                    if early is not None:
                        raise early
                    os.fsync(pending.fd)
                    pending._link_beside()
                except OSError as exc:
                    raise storage_error(exc, pending.target) from None
                linked.append(pending)
        except BaseException:
            for pending in linked:
                pending.discard()
            raise
        done: list[Path] = []
        for k, pending in enumerate(self._files):
            try:
                assert pending.named is not None
                os.replace(pending.named, pending.target)
            except OSError as exc:
                for rest in self._files[k:]:
                    rest.discard()
                placed = ", ".join(map(str, done)) or "none"
                raise StorageError(
                    f"{storage_error(exc, pending.target, 'putting in place')}; already in place: {placed}; "
                    f"not written: {', '.join(str(p.target) for p in self._files[k:])}"
                ) from None
            pending.named = None
            os.close(pending.fd)
            pending.fd = -1
            done.append(pending.target)
        with contextlib.suppress(OSError):
            for folder in {p.parent for p in done}:
                dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def discard(self) -> None:
        for pending in (*self._files, *self._scratch):
            pending.discard()
        self._flushes.clear()  # each holds its own descriptor and closes it when it ends

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def __iter__(self) -> Iterator[PendingFile]:
        return iter(self._files)
