"""``vmdelta serve`` starting a real QEMU: the realistic VM's overlay is sent over loopback, the
server rebuilds its disk and streams its memory into ``qemu-system-x86_64 -incoming fd:0``, and
the guest resumes with its page cache and its files intact. An overlay cut short never starts it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixture_guest import RunningGuest, qemu_argv, stream_capture

from vmdelta_core.errors import VmdeltaError
from vmdelta_core.registry import default_registry
from vmdelta_core.serve import BaseCatalog, OverlayServer, QemuLaunch, ServeConfig, ServedBase, send_overlay

pytestmark = [pytest.mark.fixtures, pytest.mark.slow]

TOKEN = "a token for the cloudlet under test"
VMDELTA = [sys.executable, "-m", "vmdelta_core"]


@pytest.fixture(scope="module")
def overlay(realistic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The realistic VM (QEMU 7.2 memory stream + disk) as a stream-form overlay."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if not stream_capture(realistic):
        pytest.skip("the primary capture is not a QEMU 7.2 stream of the realistic guest")
    out = tmp_path_factory.mktemp("overlay") / "vm.vmds"
    f = realistic
    pairs = [
        "--memory",
        str(f / "base.mem"),
        str(f / "modified.mem"),
        "--disk",
        str(f / "base.img"),
        str(f / "modified.img"),
    ]
    with open(out, "wb") as sink:
        subprocess.run([*VMDELTA, "create", "-q", "-o", "-", *pairs], stdout=sink, check=True, timeout=600)
    return out


@pytest.fixture
def server(realistic: Path, tmp_path: Path) -> Iterator[OverlayServer]:
    """A server holding the realistic bases, starting the guest with its rebuilt disk."""
    vms = tmp_path / "vms"
    command = qemu_argv(realistic, f"{vms}/{{name}}", disk="{disk0}", incoming="fd:0")
    config = ServeConfig(
        output=tmp_path / "out",
        bases=[ServedBase("memory", realistic / "base.mem"), ServedBase("disk", realistic / "base.img")],
        token=TOKEN,
        port=0,
        timeout=60.0,
        threads=2,
        qemu=QemuLaunch(command),
    )
    registry = default_registry()
    server = OverlayServer(config, BaseCatalog.build(config.bases, registry, None), registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)


def test_the_guest_resumes_from_an_overlay_sent_to_serve(overlay: Path, server: OverlayServer, tmp_path: Path) -> None:
    folder = tmp_path / "vms" / "vm1"
    folder.mkdir(parents=True)
    answer = send_overlay(overlay, *server.address, token=TOKEN, name="vm1", timeout=120)
    assert answer["status"] == "ok" and answer["vm"]["status"] == "started", answer
    # QEMU loads the stream, the guest checks its cached files against the disk's and powers off
    seen = RunningGuest(folder).resume(timeout=180)
    assert seen["loaded"] <= seen["running"] <= seen["checked"]


def test_an_overlay_cut_short_never_starts_the_guest(overlay: Path, server: OverlayServer, tmp_path: Path) -> None:
    cut = tmp_path / "cut.vmds"
    cut.write_bytes(overlay.read_bytes()[: overlay.stat().st_size * 7 // 10])
    (tmp_path / "vms" / "cut").mkdir(parents=True)
    with pytest.raises(VmdeltaError, match="cut short"):
        send_overlay(cut, *server.address, token=TOKEN, name="cut", timeout=120)
    assert not (tmp_path / "vms" / "cut" / "qmp.sock").exists()  # QEMU never started
    assert not (server.config.output / "cut").exists()
