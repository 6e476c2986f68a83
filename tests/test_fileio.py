"""fileio: inputs are regular files or one clear error; sparse extents are exact; punched and
skipped ranges read as zeros; kernel copies land where they should, with or without the kernel."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core import fileio
from vmdelta_core.errors import ConfigError
from vmdelta_core.fileio import (
    check_input,
    copy_range,
    data_extents,
    describe_file_type,
    hole_extents,
    open_regular,
    punch_hole,
    punch_zero_runs,
)

KIB = 1024
UNIT = 4096


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sparse_file(path: Path, size: int, extents: list[tuple[int, int]]) -> None:
    """A file of ``size`` bytes holding nonzero data only in ``extents``."""
    with open(path, "wb") as f:
        f.truncate(size)
        for start, length in extents:
            f.seek(start)
            f.write(b"\xa5" * length)


@pytest.fixture
def sparse_folder(tmp_path: Path) -> Path:
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 * KIB)
        f.write(b"x")
    if data_extents(probe).tolist() != [[512 * KIB, UNIT]]:
        pytest.skip("this file system does not report holes")
    probe.unlink()
    return tmp_path


# --------------------------------------------------------------------------------------------
# open_regular, check_input, describe_file_type
# --------------------------------------------------------------------------------------------


def test_a_regular_file_opens_blocking_and_not_inherited_through_links_too(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"vmdelta")
    (tmp_path / "link.img").symlink_to("disk.img")
    fd = open_regular(tmp_path / "link.img", "base disk")
    try:
        assert os.get_blocking(fd) and not os.get_inheritable(fd)
        assert os.read(fd, 16) == b"vmdelta"
    finally:
        os.close(fd)


@pytest.fixture
def odd_files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block for ever
    (tmp_path / "folder").mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "socket"))
    (tmp_path / "to-fifo").symlink_to(tmp_path / "fifo")
    try:
        yield {"device": Path("/dev/null")} | {n: tmp_path / n for n in ("fifo", "folder", "socket", "to-fifo")}
    finally:
        server.close()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("fifo", "a FIFO"),
        ("folder", "a directory"),
        ("socket", "a socket"),
        ("to-fifo", "a FIFO"),
        ("device", "a character device"),
    ],
)
def test_what_is_not_a_regular_file_is_refused_by_what_it_is(odd_files: dict[str, Path], name: str, words: str) -> None:
    before = open_fds()
    with pytest.raises(ConfigError) as caught:
        open_regular(odd_files[name], "modified disk")
    assert str(caught.value) == f"modified disk {odd_files[name]} is {words}; vmdelta reads only regular files"
    assert open_fds() == before


def test_missing_files_and_dangling_links_do_not_exist(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to("nowhere")
    for path in (tmp_path / "gone.img", tmp_path / "dangling"):
        with pytest.raises(ConfigError) as caught:
            check_input(path, "base memory")
        assert str(caught.value) == f"base memory {path} does not exist"


def test_check_input_leaves_no_descriptor_open(tmp_path: Path) -> None:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(UNIT))
    before = open_fds()
    for _ in range(50):
        check_input(path, "base disk")
        with pytest.raises(ConfigError):
            check_input(tmp_path, "base disk")
    assert open_fds() == before


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        (stat.S_IFLNK, "a symbolic link"),
        (stat.S_IFDIR | 0o755, "a directory"),
        (stat.S_IFIFO | 0o600, "a FIFO"),
        (stat.S_IFBLK, "a block device"),
        (stat.S_IFCHR, "a character device"),
        (stat.S_IFSOCK, "a socket"),
        (0, "not a regular file"),
    ],
)
def test_describe_file_type_says_what_the_file_is(mode: int, words: str) -> None:
    assert describe_file_type(mode) == words


# --------------------------------------------------------------------------------------------
# data_extents, hole_extents
# --------------------------------------------------------------------------------------------


def test_extents_of_a_sparse_file_are_exact(sparse_folder: Path) -> None:
    path = sparse_folder / "sparse.img"
    sparse_file(path, 1 << 20, [(64 * KIB, 8 * KIB), (512 * KIB, 4 * KIB)])
    assert data_extents(path).tolist() == [[64 * KIB, 8 * KIB], [512 * KIB, 4 * KIB]]
    assert hole_extents(path).tolist() == [[0, 64 * KIB], [72 * KIB, 440 * KIB], [516 * KIB, 508 * KIB]]


def test_data_extents_are_clipped_to_the_range_asked(sparse_folder: Path) -> None:
    path = sparse_folder / "sparse.img"
    sparse_file(path, 1 << 20, [(64 * KIB, 8 * KIB), (512 * KIB, 4 * KIB)])
    assert data_extents(path, 68 * KIB, 514 * KIB).tolist() == [[68 * KIB, 4 * KIB], [512 * KIB, 2 * KIB]]
    assert data_extents(path, 72 * KIB, 512 * KIB).tolist() == []
    assert data_extents(path, 600 * KIB).tolist() == []


def test_files_all_hole_all_data_or_empty(sparse_folder: Path) -> None:
    hole, full, empty = sparse_folder / "hole", sparse_folder / "full", sparse_folder / "empty"
    sparse_file(hole, 256 * KIB, [])
    sparse_file(full, 10_000, [(0, 10_000)])  # a short last block is data up to the end of the file
    empty.touch()
    assert (data_extents(hole).shape, hole_extents(hole).tolist()) == ((0, 2), [[0, 256 * KIB]])
    assert (data_extents(full).tolist(), hole_extents(full).shape) == ([[0, 10_000]], (0, 2))
    assert data_extents(empty).shape == hole_extents(empty).shape == (0, 2)


def test_holes_of_a_real_capture_read_as_zeros_and_data_covers_the_rest(realistic: Path) -> None:
    path = realistic / "base.img"
    data = np.memmap(path, dtype=np.uint8, mode="r")
    holes, extents = hole_extents(path), data_extents(path)
    assert int(holes[:, 1].sum()) + int(extents[:, 1].sum()) == data.size
    assert holes.shape[0] > 0  # the capture is sparse
    for start, length in holes.tolist():
        assert not data[start : start + length].any()
    runs = np.concatenate([holes, extents])
    runs = runs[np.argsort(runs[:, 0])]
    assert runs[0, 0] == 0 and (runs[1:, 0] == runs[:-1].sum(axis=1)).all()  # they tile the file


# --------------------------------------------------------------------------------------------
# punch_hole, punch_zero_runs
# --------------------------------------------------------------------------------------------


def punched(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, offset, length)
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize(
    "fallocate",
    [None, False, lambda *args: -1],  # the real call; none available; a file system that refuses it
    ids=["fallocate", "no-fallocate", "refused"],
)
def test_punch_hole_leaves_zeros_there_and_nothing_else_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallocate: object
) -> None:
    if fallocate is not None:
        monkeypatch.setattr(fileio, "_fallocate", fallocate)
    path = tmp_path / "disk.img"
    size = 3 << 20
    before = np.random.default_rng(1).integers(1, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(before)
    offset, length = 5000, (2 << 20) + 123  # off the block grid, and more than one step of zeros
    after = punched(path, offset, length)
    assert len(after) == size
    assert after[:offset] == before[:offset] and after[offset + length :] == before[offset + length :]
    assert after[offset : offset + length] == bytes(length)


def test_punch_hole_frees_whole_blocks(sparse_folder: Path) -> None:
    path = sparse_folder / "disk.img"
    sparse_file(path, 256 * KIB, [(0, 256 * KIB)])
    punched(path, 64 * KIB, 128 * KIB)
    assert data_extents(path).tolist() == [[0, 64 * KIB], [192 * KIB, 64 * KIB]]


def write_with_holes(path: Path, start: int, data: np.ndarray, unit: int) -> bytes:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, start + data.size)
        punch_zero_runs(fd, start, data, unit)
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("unit", [4096, 1000])  # a unit not a multiple of 8 takes the slower test
def test_punch_zero_runs_writes_exactly_the_data(tmp_path: Path, unit: int) -> None:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 20 * unit + 300, dtype=np.uint8)  # a short tail past the last unit
    for first, end in ((0, 2), (5, 9), (12, 13), (19, 20)):
        data[first * unit : end * unit] = 0
    data[3 * unit + 7] = 0  # a zero byte is not a zero unit
    written = write_with_holes(tmp_path / "ram.raw", 2 * unit, data, unit)
    assert written == bytes(2 * unit) + data.tobytes()
    data[20 * unit :] = 0  # a zero tail
    assert write_with_holes(tmp_path / "ram.raw", 0, data, unit) == data.tobytes()


def test_punch_zero_runs_of_real_memory_leaves_its_zero_pages_as_holes(realistic: Path, sparse_folder: Path) -> None:
    ram = np.memmap(realistic / "variants" / "qemu-7.2-ignore-shared" / "modified-ram.raw", dtype=np.uint8, mode="r")
    data = np.asarray(ram[: 16 << 20])
    pages = data.reshape(-1, UNIT)
    zero = ~pages.any(axis=1)
    assert zero.any() and not zero.all()
    path = sparse_folder / "ram.raw"
    assert write_with_holes(path, 0, data, UNIT) == data.tobytes()
    in_hole = np.zeros(zero.size, dtype=bool)
    for start, length in hole_extents(path).tolist():
        in_hole[start // UNIT : (start + length) // UNIT] = True
    assert np.array_equal(in_hole, zero)


# --------------------------------------------------------------------------------------------
# copy_range
# --------------------------------------------------------------------------------------------


def copied(tmp_path: Path, offset: int, length: int, src_size: int = 1 << 20) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(3)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(rng.integers(0, 256, src_size, dtype=np.uint8).tobytes())
    dst.write_bytes(b"\xee" * (1 << 20))
    with open(src, "rb") as s, open(dst, "r+b") as d:
        copy_range(s.fileno(), d.fileno(), offset, length)
    return src.read_bytes(), dst.read_bytes()


def no_kernel_copy(code: int) -> Callable[..., int]:
    def refuse(*args: object) -> int:
        raise OSError(code, os.strerror(code))

    return refuse


@pytest.mark.parametrize("kernel", [None, errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL])
def test_copy_range_copies_to_the_same_place_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: int | None
) -> None:
    if kernel is not None:
        monkeypatch.setattr(os, "copy_file_range", no_kernel_copy(kernel))
    offset, length = 12_345, 700_001
    src, dst = copied(tmp_path, offset, length)
    assert dst[offset : offset + length] == src[offset : offset + length]
    assert dst[:offset] == b"\xee" * offset and dst[offset + length :] == b"\xee" * ((1 << 20) - offset - length)


def test_copy_range_past_the_end_of_the_source_fails(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="source file ended early"):
        copied(tmp_path, 4096, 8192, src_size=6000)


def test_copy_range_does_not_hide_other_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy(errno.EIO))
    with pytest.raises(OSError) as caught:
        copied(tmp_path, 0, 4096)
    assert caught.value.errno == errno.EIO
