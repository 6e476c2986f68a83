"""The destination's thin disk and the NBD client under it, on a real ``qemu-nbd``: blocks
written land in a qcow2 over the base that passes ``qemu-img check``; the qcow2 shows the base
where nothing was written; a file in the way is never written over, and a discarded disk is gone.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.errors import ConfigError
from vmdelta_core.handoff.disk import ThinDisk
from vmdelta_core.handoff.nbd import NbdClient

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None, reason="qemu-utils is not installed"
)

SIZE = 1 << 20
rng = np.random.default_rng(12)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    return path


def test_blocks_written_land_over_the_base(base: Path, tmp_path: Path) -> None:
    new = rng.integers(0, 256, 3 * 4096, dtype=np.uint8).tobytes()
    disk = ThinDisk(tmp_path / "vm.qcow2", base, SIZE)
    disk.write(8192, new)
    disk.write_zeroes(65536, 4096)
    disk.finish()
    expected = bytearray(base.read_bytes())
    expected[8192 : 8192 + len(new)] = new
    expected[65536 : 65536 + 4096] = bytes(4096)
    raw = tmp_path / "seen.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "vm.qcow2"), str(raw)], check=True)
    assert raw.read_bytes() == expected
    info = subprocess.run(["qemu-img", "info", str(tmp_path / "vm.qcow2")], capture_output=True, text=True).stdout
    assert f"backing file: {base}" in info


def test_the_client_reads_what_the_server_holds_and_its_allocation(base: Path, tmp_path: Path) -> None:
    image = tmp_path / "vm.qcow2"
    disk = ThinDisk(image, base, SIZE)
    disk.write(0, bytes([9]) * 4096)
    disk.finish()
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), "--allocation-depth", str(image)])
    try:
        client = _connect(sock)
        with client:
            assert client.size == SIZE
            assert client.read(0, 8192) == bytes([9]) * 4096 + base.read_bytes()[4096:8192]
            depth = list(client.extents("qemu:allocation-depth"))
        assert depth[0][0] == 0 and depth[0][2] == 1  # the written cluster: the top layer
        assert sum(length for _, length, _ in depth) == SIZE
        assert all(d == 2 for _, _, d in depth[1:])  # the rest is the base's
    finally:
        server.kill()
        server.wait()


def _connect(sock: Path) -> NbdClient:
    import contextlib
    import time

    from vmdelta_core.handoff.nbd import NbdError

    for _ in range(500):
        with contextlib.suppress(NbdError):
            return NbdClient(sock, "", ("qemu:allocation-depth",))
        time.sleep(0.01)
    raise AssertionError("qemu-nbd did not answer")


def test_a_file_in_the_way_is_never_written_over(base: Path, tmp_path: Path) -> None:
    mine = tmp_path / "vm.qcow2"
    mine.write_bytes(b"the user's own file")
    with pytest.raises(ConfigError, match="exists"):
        ThinDisk(mine, base, SIZE)
    assert mine.read_bytes() == b"the user's own file"


def test_a_discarded_disk_is_gone(base: Path, tmp_path: Path) -> None:
    disk = ThinDisk(tmp_path / "vm.qcow2", base, SIZE)
    disk.write(0, bytes(4096))
    disk.discard()
    assert not (tmp_path / "vm.qcow2").exists()
