"""``vmdelta serve`` starting the VM: the memory stream goes to the process's standard input as the
overlay arrives, and a process whose overlay fails never sees the stream's end and is stopped.

The "VM" is a small script reading its standard input to its end, so no QEMU is needed.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from samples import running_server, vm_overlays

from vmdelta_core.errors import ConfigError
from vmdelta_core.serve import OverlayServer, QemuLaunch, ServeConfig, ServedBase, send_overlay
from vmdelta_core.serve.protocol import CHUNK_FIELD, pack_hello, prologue_end, read_line
from vmdelta_core.serve.settings import load_serve_config

TOKEN = "correct horse battery staple"

FAKE_QEMU = """\
import json, os, sys
from pathlib import Path
folder, name, disk = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
# as QEMU does, open the disk as the VM starts (so it must exist then), read it once the memory stream ended
fd = os.open(disk, os.O_RDONLY) if os.path.exists(disk) else None
(folder / (name + ".opened")).write_text("yes" if fd is not None else "no")
got = sys.stdin.buffer.read()
(folder / (name + ".got")).write_bytes(got)
(folder / (name + ".disk")).write_bytes(b"" if fd is None else os.pread(fd, os.fstat(fd).st_size, 0))
(folder / (name + ".argv")).write_text(json.dumps(sys.argv[1:]))
(folder / (name + ".argv")).rename(folder / (name + ".done"))  # whole once it appears
"""


@pytest.fixture(scope="module", params=["in-place", "grown"])
def vm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Path]:
    """A memory of several write chunks and a disk, their overlay in the stream form. ``in-place``:
    the disk keeps its base's size, so it is rebuilt in the very file that becomes the output and
    the VM can be handed that file as it starts; ``grown``: the VM starts once the disk is in place."""
    folder = tmp_path_factory.mktemp("vm")
    made = vm_overlays(folder, seed=3, memory_units=700, grow=0 if request.param == "in-place" else 3000)
    made["early"] = request.param == "in-place"  # type: ignore[assignment]
    script = folder / "fake_qemu.py"
    script.write_text(FAKE_QEMU)
    return {**made, "script": script}


@pytest.fixture(params=["{disk0}"])
def server(vm: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OverlayServer]:
    """A server starting the fake VM; its third argument names the rebuilt disk (``{disk0}``, a
    VM started only once its disks are in place) or not (a VM started at once)."""
    seen = tmp_path / "seen"
    seen.mkdir()
    config = ServeConfig(
        output=tmp_path / "out",
        bases=[ServedBase("memory", vm["memory_base"]), ServedBase("disk", vm["disk_base"])],
        token=TOKEN,
        port=0,
        cache_dir=vm["cache"],
        timeout=10.0,
        threads=2,
        qemu=QemuLaunch([sys.executable, str(vm["script"]), str(seen), "{name}", request.param, "-incoming", "fd:0"]),
    )
    with running_server(config) as server:
        yield server


def test_the_vm_receives_exactly_the_memory_artifact(vm, server, tmp_path: Path) -> None:
    answer = send_overlay(vm["stream_form"], *server.address, token=TOKEN, timeout=20, name="vm1")
    assert answer["status"] == "ok" and answer["vm"]["status"] == "started"
    assert isinstance(answer["vm"]["pid"], int)
    assert [o["file"] for o in answer["outputs"]] == ["-", "disk0"]
    folder = server.config.output / "vm1"
    assert sorted(p.name for p in folder.iterdir()) == ["disk0"]
    assert (folder / "disk0").read_bytes() == vm["disk"].read_bytes()
    seen = tmp_path / "seen"
    for _ in range(200):  # the script writes once its standard input ends
        if (seen / "vm1.done").exists():
            break
        threading.Event().wait(0.05)
    argv = json.loads((seen / "vm1.done").read_text())[1:]
    if vm["early"]:
        # started at once, handed the file its disk was being rebuilt in (which it reads only
        # once its memory stream ended): the file that now has the output's name
        assert argv[0] == "vm1" and argv[1].startswith("/proc/") and argv[2:] == ["-incoming", "fd:0"]
    else:
        assert argv == ["vm1", str(folder / "disk0"), "-incoming", "fd:0"]  # in place when it started
    assert (seen / "vm1.opened").read_text() == "yes"
    assert (seen / "vm1.got").read_bytes() == vm["memory"].read_bytes()
    assert (seen / "vm1.disk").read_bytes() == vm["disk"].read_bytes()


def test_a_cut_overlay_never_ends_the_stream_and_stops_the_vm(vm, server, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, "vmdelta.serve")
    stream = vm["stream_form"].read_bytes()
    with socket_to(server) as sock:
        sock.sendall(pack_hello(TOKEN, "cut"))
        sock.sendall(CHUNK_FIELD.pack(prologue_end(stream)) + stream[: prologue_end(stream)])
        assert read_line(sock)["status"] == "ready"
        rest = stream[prologue_end(stream) : len(stream) * 7 // 10]
        sock.sendall(CHUNK_FIELD.pack(len(rest)) + rest + CHUNK_FIELD.pack(0))
        answer = read_line(sock)
    assert answer["status"] == "error" and answer["error"] == "format" and "cut short" in answer["message"]
    assert "vm" not in answer
    if vm["early"]:
        # the VM started with the file its disk was being rebuilt in; it never saw its memory
        # stream end, and was stopped
        assert not (tmp_path / "seen" / "cut.got").exists()
        assert "stopped the VM for cut" in caplog.text
    else:
        # a VM that opens rebuilt disks starts only once they are in place: this one never did
        assert not (tmp_path / "seen" / "cut.opened").exists()
        assert "started VM cut" not in caplog.text
    assert not (server.config.output / "cut").exists()


@pytest.mark.parametrize("server", ["no-disk"], indirect=True)
def test_a_vm_without_rebuilt_disks_starts_at_once_and_is_stopped_when_the_overlay_fails(
    vm, server, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO, "vmdelta.serve")
    stream = vm["stream_form"].read_bytes()
    with socket_to(server) as sock:
        sock.sendall(pack_hello(TOKEN, "early"))
        sock.sendall(CHUNK_FIELD.pack(prologue_end(stream)) + stream[: prologue_end(stream)])
        assert read_line(sock)["status"] == "ready"
        rest = stream[prologue_end(stream) : len(stream) * 7 // 10]
        sock.sendall(CHUNK_FIELD.pack(len(rest)) + rest + CHUNK_FIELD.pack(0))
        answer = read_line(sock)
    assert answer["status"] == "error" and "cut short" in answer["message"] and "vm" not in answer
    # it was streamed to while the overlay arrived, and stopped without the stream's end
    got = (tmp_path / "seen" / "early.got").read_bytes() if (tmp_path / "seen" / "early.got").exists() else b""
    memory = vm["memory"].read_bytes()
    assert len(got) < len(memory) and memory.startswith(got)
    assert "stopped the VM for early" in caplog.text


def socket_to(server: OverlayServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=20)


# ------------------------------------------------------------------------------------------------
# the [qemu] table
# ------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, qemu: str) -> Path:
    (tmp_path / "token").write_text(TOKEN)
    path = tmp_path / "SERVE.toml"
    path.write_text(f'output = "out"\ntoken_file = "token"\n[[bases]]\nkind = "memory"\npath = "base.mem"\n{qemu}')
    return path


def test_the_qemu_table_is_read(tmp_path: Path) -> None:
    path = _config(
        tmp_path, '[qemu]\ncommand = ["qemu", "-drive", "file={disk1}", "-name", "{name}", "-incoming", "fd:0"]\n'
    )
    launch = load_serve_config(path).qemu
    assert launch is not None and launch.disks == 2
    assert launch.argv("vm1", [Path("/o/disk0"), Path("/o/disk1")]) == [
        "qemu",
        "-drive",
        "file=/o/disk1",
        "-name",
        "vm1",
        "-incoming",
        "fd:0",
    ]
    with pytest.raises(ConfigError, match="disk1"):
        launch.argv("vm1", [Path("/o/disk0")])


def test_braces_that_are_no_placeholder_stay(tmp_path: Path) -> None:
    launch = QemuLaunch(["qemu", "-blockdev", '{"driver":"file","filename":"{disk0}"}', "-incoming", "exec:cat"])
    assert launch.argv("x; rm -rf /", [Path("/o/disk0")])[2] == '{"driver":"file","filename":"/o/disk0"}'


@pytest.mark.parametrize(
    ("qemu", "message"),
    [
        ('[qemu]\ncommand = ["qemu", "{disk}", "-incoming", "fd:0"]\n', "unknown placeholder {disk}"),
        ('[qemu]\ncommand = ["qemu", "{home}", "-incoming", "fd:0"]\n', "unknown placeholder {home}"),
        ('[qemu]\ncommand = ["qemu", "-incoming", "tcp:0:4444"]\n', "-incoming fd:0"),
        ('[qemu]\ncommand = "qemu -incoming fd:0"\n', "list of strings"),
        ("[qemu]\ncommand = []\n", "non-empty"),
        ('[qemu]\ncommand = ["qemu", "-incoming", "fd:0"]\nshell = true\n', "unknown key 'shell'"),
    ],
)
def test_a_bad_qemu_table_is_a_config_error(tmp_path: Path, qemu: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_serve_config(_config(tmp_path, qemu))
