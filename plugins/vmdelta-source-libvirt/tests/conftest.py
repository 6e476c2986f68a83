from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from libvirt_guest import Guest, LibvirtUnavailable, libvirt_daemons
from libvirt_helpers import small_stream


@pytest.fixture(scope="session")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real QEMU 7.2 stream of a small stopped VM (a few hundred KB)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 (Debian package qemu-system-x86) is not installed")
    return small_stream(tmp_path_factory.mktemp("small") / "small.mem").read_bytes()


@attrs.frozen
class Saves:
    """Real ``virsh save`` images of one guest: idle after boot (``a``), after it filled
    16 MiB of its RAM with random bytes (``b``, whose MD5 the guest printed)."""

    guest: Guest
    a: Path
    b: Path
    md5: str


@pytest.fixture(scope="session")
def saves(fixture_set: Path) -> Iterator[Saves]:
    """Boots the guest under libvirt, saves it, restores it, lets it work, saves it again.
    Skipped where libvirt cannot run, unless ``VMDELTA_REQUIRE_LIBVIRT=1`` (CI)."""
    try:
        with libvirt_daemons():
            guest = Guest(fixture_set / "boot")
            try:
                guest.start()
                a, b = guest.folder / "a.sav", guest.folder / "b.sav"
                guest.save(a)
                guest.restore(a)
                md5 = guest.work(16)
                guest.save(b)
                yield Saves(guest, a, b, md5)
            finally:
                guest.remove()
    except LibvirtUnavailable as exc:
        if os.environ.get("VMDELTA_REQUIRE_LIBVIRT") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
