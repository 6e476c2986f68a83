from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from disk_helpers import qemu_img, qemu_io


@pytest.fixture(scope="session")
def need_qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img (Debian package qemu-utils) is not installed")


@pytest.fixture(scope="session")
def disks(tmp_path_factory: pytest.TempPathFactory, fixture_set: Path, need_qemu_img: None) -> Path:
    """qcow2 images made by QEMU from the real raw pair, in one folder beside a copy of the base.

    ``over.qcow2`` is the modified disk as an overlay of ``base.img`` (qemu-img rebase);
    ``mid.qcow2``/``top.qcow2`` a three-level chain top -> mid -> base.img.
    """
    d = tmp_path_factory.mktemp("qcow2")
    base, modified = fixture_set / "base.img", fixture_set / "modified.img"
    shutil.copy(base, d / "base.img")
    os.chmod(d / "base.img", 0o644)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", modified, d / "v3.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10", modified, d / "v2.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", modified, d / "zlib.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd", modified, d / "zstd.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", modified, d / "small.qcow2")
    # the qcow2 overlay route: an overlay of the modified disk, rebased onto the base (safe mode
    # copies exactly the clusters where the two differ)
    qemu_img("create", "-q", "-f", "qcow2", "-b", modified, "-F", "raw", d / "thin.qcow2")
    qemu_img("rebase", "-b", "base.img", "-F", "raw", d / "thin.qcow2")
    # the same, every cluster of the modified disk kept (a guest that rewrote equal data)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", modified, d / "over.qcow2")
    qemu_img("rebase", "-u", "-b", "base.img", "-F", "raw", d / "over.qcow2")
    # a chain top (4 KiB clusters) -> mid (the changes) -> base.img, written through by qemu-io
    qemu_img("create", "-q", "-f", "qcow2", "-b", modified, "-F", "raw", d / "mid.qcow2")
    qemu_img("rebase", "-b", "base.img", "-F", "raw", d / "mid.qcow2")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2"
    )
    qemu_io(d / "top.qcow2", "write -P 0x5a 1M 12k", "write -z 2M 64k", "write -P 0x33 130560 512")
    # a grown disk, and a backing file shorter than the raw file under it (not page aligned)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", d / "grown.qcow2", "192M")
    qemu_io(d / "grown.qcow2", "write -P 0x77 150M 100k", "write -P 0x11 64k 8k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", d / "short.qcow2", str(64 * 2**20 + 512))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "short.qcow2", "-F", "qcow2", d / "long.qcow2", "128M")
    return d
