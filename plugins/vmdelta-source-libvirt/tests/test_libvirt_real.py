"""Real ``virsh save`` images of a TCG guest (libvirt 9.0.0, QEMU 7.2, Debian 12): read,
rebuilt byte for byte through an overlay, and the rebuilt image restored by ``virsh restore``
with the guest running on, the file it wrote before the save intact.

Needs libvirt (``libvirt-daemon-system``, ``libvirt-clients``), root to start its daemons when
none runs, and the fixture set's kernel and initramfs; skipped otherwise, unless
``VMDELTA_REQUIRE_LIBVIRT=1``. libvirt 9.0 cannot be told to compress a single save (only
``save_image_format`` in ``qemu.conf``), so the compressed images are made from the real save
as libvirt makes them, its stream piped through ``PROGRAM -c``, and restored the same way.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import Saves
from libvirt_helpers import FORMATS, compress
from vmdelta_source_libvirt import LibvirtSource

from vmdelta_core.testing import check_source, main

pytestmark = pytest.mark.fixtures


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recompressed(save: Path, fmt: str) -> Path:
    """``save`` with its stream compressed as libvirt compresses it, the header saying so."""
    data = save.read_bytes()
    start = 92 + int.from_bytes(data[20:24], "little")
    out = save.with_name(f"{save.stem}-{fmt}.sav")
    out.write_bytes(data[:28] + FORMATS[fmt].to_bytes(4, "little") + data[32:start] + compress(fmt, data[start:]))
    return out


def _rebuild(saves: Saves, base: Path, modified: Path, name: str) -> Path:
    work = saves.guest.folder
    overlay = work / f"{name}.vmdo"
    assert main(["create", "-o", str(overlay), "--memory", str(base), str(modified)]) == 0
    out = work / f"{name}.sav"
    assert main(["apply", str(overlay), "--memory", str(base), str(out)]) == 0
    return out


def test_real_saves_read_and_rebuild_byte_for_byte(saves: Saves) -> None:
    for save in (saves.a, saves.b):
        image = check_source(LibvirtSource(), save, "memory")
        with image:
            assert image.exact_artifact
            info = image.layout["libvirt"]
            assert info["domain"] == saves.guest.name and info["was_running"] is True
            assert info["compression"] == "raw" and info["version"] == 2 and info["cookie_bytes"] > 0
            assert image.layout["blocks"][0]["name"] == "pc.ram"
            assert image.layout["blocks"][0]["length"] == 128 << 20


def test_an_overlay_rebuilds_the_save_and_it_restores(saves: Saves) -> None:
    rebuilt = _rebuild(saves, saves.a, saves.b, "rebuilt-b")
    assert _sha(rebuilt) == _sha(saves.b)
    saves.guest.restore(rebuilt)
    try:
        assert saves.guest.checksum() == saves.md5
    finally:
        saves.guest.destroy()


@pytest.mark.parametrize("fmt", ["gzip", "lzop"])
def test_a_compressed_save_rebuilds_byte_for_byte_and_restores(saves: Saves, fmt: str) -> None:
    if shutil.which(fmt) is None:
        pytest.skip(f"{fmt} is not installed")
    modified = _recompressed(saves.b, fmt)
    rebuilt = _rebuild(saves, saves.a, modified, f"rebuilt-b-{fmt}")
    assert _sha(rebuilt) == _sha(modified)
    saves.guest.restore(rebuilt)
    try:
        assert saves.guest.checksum() == saves.md5
    finally:
        saves.guest.destroy()
