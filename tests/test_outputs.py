"""Outputs: never an input, never a non-regular file, invisible until whole, all or nothing."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from vmdelta_core import outputs as outputs_module
from vmdelta_core.errors import ConfigError, StorageError
from vmdelta_core.outputs import OutputSet, PendingFile


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(b"the base")
    return path


def test_an_output_may_not_be_an_input_by_any_route(tmp_path: Path, base: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "hard").hardlink_to(base)
    (tmp_path / "soft-dir").symlink_to(tmp_path)
    routes = [
        base,
        tmp_path / "sub" / ".." / "base.img",
        tmp_path / "hard",  # a hard link
        tmp_path / "soft-dir" / "base.img",  # through a symbolic link to the folder
    ]
    for route in routes:
        with pytest.raises(ConfigError, match="same file as an input"):
            OutputSet([base]).check(route)
    assert base.read_bytes() == b"the base"


def test_an_output_under_a_bind_mount_of_the_input_is_caught(tmp_path: Path, base: Path) -> None:
    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path), str(view)], capture_output=True).returncode:
        pytest.skip("bind mounts need privileges this run does not have")
    try:
        with pytest.raises(ConfigError, match="same file as an input"):
            OutputSet([base]).check(view / "base.img")
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_non_regular_outputs_are_refused_and_left_alone(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    cases = {fifo: "a FIFO", link: "a symbolic link", tmp_path: "a directory", Path("/dev/null"): "a character device"}
    for path, what in cases.items():
        with pytest.raises(ConfigError, match=f"is {what}"):
            OutputSet([]).check(path)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_an_output_named_twice_is_refused(tmp_path: Path) -> None:
    existing = tmp_path / "a"
    existing.write_bytes(b"x")
    (tmp_path / "b").hardlink_to(existing)
    outputs = OutputSet([])
    outputs.check(tmp_path / "new")
    with pytest.raises(ConfigError, match="named twice"):
        outputs.check(tmp_path / "." / "new")
    outputs.check(existing)
    with pytest.raises(ConfigError, match="same file as output"):
        outputs.check(tmp_path / "b")


def test_a_missing_folder_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        OutputSet([]).add(tmp_path / "nowhere" / "out")


def test_pending_files_have_no_name_until_commit(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"old b")
    with OutputSet([]) as outputs:
        a = outputs.add(tmp_path / "a")
        b = outputs.add(tmp_path / "b")
        scratch = outputs.scratch(tmp_path / "a")
        for pending, data in ((a, b"new a"), (b, b"new b"), (scratch, b"scratch")):
            with open(pending.path, "wb") as f:
                f.write(data)
        assert names(tmp_path) == {"b"}  # nothing visible while working
        outputs.commit()
    assert names(tmp_path) == {"a", "b"}
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "b").read_bytes() == b"new b"


def test_discarded_outputs_leave_nothing_and_change_nothing(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"old b")
    with OutputSet([]) as outputs:
        for name in ("a", "b"):
            with open(outputs.add(tmp_path / name).path, "wb") as f:
                f.write(b"half")
    assert names(tmp_path) == {"b"} and (tmp_path / "b").read_bytes() == b"old b"


def test_take_publishes_another_pending_file_without_copying(tmp_path: Path) -> None:
    with OutputSet([]) as outputs:
        out = outputs.add(tmp_path / "out")
        scratch = outputs.scratch(tmp_path / "out")
        os.pwrite(scratch.fd, b"rebuilt", 0)
        inode = os.fstat(scratch.fd).st_ino
        out.take(scratch)
        outputs.commit()
    assert (tmp_path / "out").read_bytes() == b"rebuilt" and (tmp_path / "out").stat().st_ino == inode


def test_the_named_fallback_cleans_up_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):  # a file system without O_TMPFILE
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(outputs_module.os, "open", no_tmpfile)
    with OutputSet([]) as outputs:
        pending = outputs.add(tmp_path / "out")
        assert pending.named is not None and pending.named.parent == tmp_path
        pending.path.write_bytes(b"data")
    assert names(tmp_path) == set()
    with OutputSet([]) as outputs:
        outputs.add(tmp_path / "out").path.write_bytes(b"data")
        outputs.commit()
    assert names(tmp_path) == {"out"} and (tmp_path / "out").read_bytes() == b"data"


def test_a_failing_link_undoes_every_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").write_bytes(b"old a")
    calls = []
    real_link = outputs_module._link_fd

    def link_then_fail(fd: int, name: Path) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(name))
        real_link(fd, name)

    monkeypatch.setattr(outputs_module, "_link_fd", link_then_fail)
    with OutputSet([]) as outputs:
        for name in ("a", "b"):
            with open(outputs.add(tmp_path / name).path, "wb") as f:
                f.write(b"new")
        with pytest.raises(StorageError, match=r"writing .*/b: no space left on the device"):
            outputs.commit()
    assert names(tmp_path) == {"a"} and (tmp_path / "a").read_bytes() == b"old a"


def test_a_failing_rename_says_what_is_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace
    done = []

    def replace_once(src, dst):
        if done:
            raise OSError(errno.EIO, "Input/output error")
        done.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(outputs_module.os, "replace", replace_once)
    with OutputSet([]) as outputs:
        for name in ("a", "b"):
            with open(outputs.add(tmp_path / name).path, "wb") as f:
                f.write(name.encode())
        with pytest.raises(StorageError, match=r"already in place: .*/a; not written: .*/b"):
            outputs.commit()
    assert names(tmp_path) == {"a"}


def test_pending_file_reports_an_unwritable_folder_by_the_users_path(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("mounting a file system needs privileges this run does not have")
    try:
        with pytest.raises(StorageError, match=f"cannot write {ro / 'out'}: the file system is read-only"):
            PendingFile(ro / "out")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_an_output_flushed_early_is_flushed_again_and_put_in_place(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    with OutputSet([]) as outputs:
        out = outputs.add(tmp_path / "out")
        os.pwrite(out.fd, b"final bytes", 0)
        inode = os.fstat(out.fd).st_ino
        outputs.flush_early(out)
        outputs.commit()
    assert (tmp_path / "out").read_bytes() == b"final bytes"
    assert synced.count(inode) == 2  # in the background, then by the commit before its name


def test_a_failed_early_flush_fails_the_commit_though_the_next_fsync_succeeds(tmp_path: Path, monkeypatch) -> None:
    """A write error is reported once, to the first fsync that sees it: the commit must not lose
    it to its own fsync, which the kernel may then let succeed."""
    (tmp_path / "out").write_bytes(b"old")
    real_fsync = os.fsync
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with OutputSet([]) as outputs:
        out = outputs.add(tmp_path / "out")
        os.pwrite(out.fd, b"new", 0)
        outputs.flush_early(out)
        with pytest.raises(StorageError, match=f"writing {tmp_path / 'out'}: no space left on the device"):
            outputs.commit()
    assert names(tmp_path) == {"out"} and (tmp_path / "out").read_bytes() == b"old"


def test_an_output_discarded_while_it_is_flushed_leaves_nothing(tmp_path: Path) -> None:
    with OutputSet([]) as outputs:
        out = outputs.add(tmp_path / "out")
        os.pwrite(out.fd, b"x" * 65536, 0)
        outputs.flush_early(out)
    assert names(tmp_path) == set()


def test_an_output_written_back_while_it_is_made_is_whole_and_leaves_no_descriptor(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    data = os.urandom(1 << 20)
    with OutputSet([]) as outputs:
        out = outputs.add(tmp_path / "out")
        with outputs.writing_back(out, interval=0.001), open(out.path, "wb") as f:
            for at in range(0, len(data), 4096):
                f.write(data[at : at + 4096])
        outputs.commit()
    assert (tmp_path / "out").read_bytes() == data
    assert set(os.listdir("/proc/self/fd")) <= before | {str(n) for n in range(3)}
