"""``vmdelta serve`` and ``vmdelta send`` over real sockets on the loopback: outputs rebuilt byte
for byte, refusals before any frame flows, stalled and broken-off clients leaving nothing."""

from __future__ import annotations

import io
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from samples import running_server, vm_overlays

from vmdelta_core.cli import main
from vmdelta_core.errors import BaseMismatchError, ConfigError, FormatError, VmdeltaError
from vmdelta_core.serve import OverlayServer, ServeConfig, ServedBase, client_tls_context, send_overlay
from vmdelta_core.serve.protocol import CHUNK_FIELD, MAGIC, pack_hello, prologue_end, read_line
from vmdelta_core.serve.server import target_name
from vmdelta_core.serve.settings import load_serve_config, parse_address

TOKEN = "correct horse battery staple"
VMDELTA = [sys.executable, "-m", "vmdelta_core"]


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A memory pair and a grown disk pair, their overlay in both forms."""
    return vm_overlays(tmp_path_factory.mktemp("vm"), seed=1, memory_units=48)


def serving(vm: dict[str, Path], out: Path, *, kinds: tuple[str, ...] = ("memory", "disk"), **options) -> Iterator:
    config = ServeConfig(
        output=out,
        bases=[ServedBase(kind, vm[f"{kind}_base"]) for kind in kinds],
        token=TOKEN,
        port=0,
        cache_dir=vm["cache"],
        **{"timeout": 10.0, "threads": 2, **options},
    )
    with running_server(config) as server:
        yield server


@pytest.fixture
def server(vm: dict[str, Path], tmp_path: Path) -> Iterator[OverlayServer]:
    yield from serving(vm, tmp_path / "out")


def send(server: OverlayServer, overlay: Path, **kwargs) -> dict:
    return send_overlay(overlay, *server.address, token=kwargs.pop("token", TOKEN), timeout=20, **kwargs)


def assert_rebuilt(vm: dict[str, Path], folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["disk0", "memory"]
    assert (folder / "memory").read_bytes() == vm["memory"].read_bytes()
    assert (folder / "disk0").read_bytes() == vm["disk"].read_bytes()


def raw_client(server: OverlayServer, name: str | None, token: str = TOKEN) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=20)
    sock.sendall(pack_hello(token, name))
    return sock


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(CHUNK_FIELD.pack(len(data)) + data)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["file_form", "stream_form"])
def test_an_overlay_sent_is_rebuilt_byte_for_byte(vm, server, form: str) -> None:
    answer = send(server, vm[form], name="vm-1")
    assert answer["status"] == "ok" and answer["target"] == "vm-1"
    assert [o["file"] for o in answer["outputs"]] == ["memory", "disk0"]
    assert all(o["digest"].startswith("xxh3") for o in answer["outputs"])
    assert_rebuilt(vm, server.config.output / "vm-1")


def test_a_stream_is_sent_as_it_arrives(vm, server) -> None:
    with open(vm["stream_form"], "rb") as f:
        answer = send_overlay(Path("standard input"), *server.address, token=TOKEN, stream=f, timeout=20)
    assert_rebuilt(vm, server.config.output / answer["target"])  # no name: a connection id


def test_several_clients_at_once(vm, server) -> None:
    names = [f"vm{n}" for n in range(6)]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: send(server, vm["file_form"], name=n), names))
    assert [a["target"] for a in answers] == names
    for name in names:
        assert_rebuilt(vm, server.config.output / name)


def test_the_bases_are_opened_once_for_every_connection(vm, server, monkeypatch) -> None:
    """The server holds its bases open: a connection reads them as they are (for a QEMU base,
    no parsing of its stream again), and they stay open for the next one."""
    opened = []
    for source in {server.registry.source(entry.source) for entry in server.catalog.entries}:
        monkeypatch.setattr(source, "open", lambda *a, _open=source.open, **k: opened.append(a) or _open(*a, **k))
    for name in ("first", "second"):
        send(server, vm["stream_form"], name=name)
        assert_rebuilt(vm, server.config.output / name)
    assert opened == []
    assert all(entry.image is not None and entry.image.data.shape[0] for entry in server.catalog.entries)


def test_names_from_the_client_never_become_paths(vm, server) -> None:
    answer = send(server, vm["file_form"], name="../../etc/passwd")
    assert answer["target"] == "_.._etc_passwd"
    assert_rebuilt(vm, server.config.output / answer["target"])
    assert target_name("..", "c1") == "c1" and target_name("a b/c", "c1") == "a_b_c"
    assert len(target_name("x" * 500, "c1")) == 64


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


def test_a_wrong_token_is_refused_and_logged(vm, server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vmdelta.serve"), pytest.raises(ConfigError, match="wrong token"):
        send(server, vm["file_form"], name="vm", token="guess")
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 1 and "wrong token" in refused[0] and "guess" not in refused[0]
    assert not (server.config.output / "vm").exists()


def test_an_unknown_base_is_refused_before_any_frame_flows(vm, tmp_path: Path, caplog) -> None:
    stream = vm["stream_form"].read_bytes()
    end = prologue_end(stream)
    for server in serving(vm, tmp_path / "out", kinds=("memory",)):
        sock = raw_client(server, "vm")
        with sock:
            send_chunk(sock, stream[:end])  # the prologue, and not one byte more
            answer = read_line(sock)
        assert answer["status"] == "error" and answer["error"] == "base"
        assert "no disk base" in answer["message"]
        with caplog.at_level(logging.INFO, logger="vmdelta.serve"), pytest.raises(BaseMismatchError):
            send(server, vm["file_form"], name="vm")
        assert any("no disk base" in r.getMessage() for r in caplog.records)
        assert list((tmp_path / "out").iterdir()) == []


def test_a_second_client_writing_the_same_name_is_refused(vm, server) -> None:
    stream = vm["stream_form"].read_bytes()
    first = raw_client(server, "same")
    with first:
        send_chunk(first, stream[: prologue_end(stream)])
        assert read_line(first)["status"] == "ready"
        with pytest.raises(VmdeltaError, match="another connection is writing 'same'") as caught:
            send(server, vm["file_form"], name="same")
        assert caught.value.exit_code == 1
        send_chunk(first, stream[prologue_end(stream) :])
        send_chunk(first, b"")
        assert read_line(first)["status"] == "ok"
    assert_rebuilt(vm, server.config.output / "same")
    send(server, vm["file_form"], name="same")  # once the first is done, the name is free again


def test_a_client_past_max_connections_is_refused(vm, tmp_path: Path) -> None:
    stream = vm["stream_form"].read_bytes()
    for server in serving(vm, tmp_path / "out", max_connections=1):
        with raw_client(server, "first") as first:
            send_chunk(first, stream[: prologue_end(stream)])
            assert read_line(first)["status"] == "ready"
            with pytest.raises(VmdeltaError, match="too many connections"):
                send(server, vm["file_form"], name="second")
        assert not (tmp_path / "out" / "second").exists()


def test_a_client_that_is_not_the_transport_is_refused(server) -> None:
    with socket.create_connection(server.address, timeout=20) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_line(sock)
    assert answer["error"] == "format" and "bad magic" in answer["message"]


# ------------------------------------------------------------------------------------------------
# clients that stall or break off, servers that stop
# ------------------------------------------------------------------------------------------------


def test_a_stalling_client_is_dropped_and_leaves_nothing(vm, tmp_path: Path, caplog) -> None:
    stream = vm["stream_form"].read_bytes()
    with caplog.at_level(logging.INFO, logger="vmdelta.serve"):
        for server in serving(vm, tmp_path / "out", timeout=0.5):
            sock = raw_client(server, "stall")
            with sock:
                send_chunk(sock, stream[: prologue_end(stream)])
                assert read_line(sock)["status"] == "ready"
                send_chunk(sock, stream[prologue_end(stream) : len(stream) // 2])
                started = time.monotonic()
                sock.settimeout(10)
                answer = read_line(sock)  # then nothing: the server gives up
                assert time.monotonic() - started < 5
            assert answer["status"] == "error" and "no data for 0.5 s" in answer["message"]
            assert list((tmp_path / "out").iterdir()) == []
    assert any("no data for 0.5 s" in r.getMessage() for r in caplog.records)


def test_a_client_breaking_off_leaves_nothing(vm, server) -> None:
    stream = vm["stream_form"].read_bytes()
    with raw_client(server, "cut") as sock:
        send_chunk(sock, stream[: prologue_end(stream)])
        assert read_line(sock)["status"] == "ready"
        send_chunk(sock, stream[prologue_end(stream) : -100])
        send_chunk(sock, b"")  # the end, a hundred bytes early
        answer = read_line(sock)
    assert answer["error"] == "format" and "cut short" in answer["message"]
    assert not (server.config.output / "cut").exists()


def test_a_damaged_stream_form_file_is_refused_by_the_server(vm, server, tmp_path: Path) -> None:
    """A stream-form file is relayed as it is, unread by the client: the server's checks refuse it."""
    stream = bytearray(vm["stream_form"].read_bytes())
    stream[prologue_end(stream) + 200] ^= 0x40  # inside the first frame
    damaged = tmp_path / "damaged.vmds"
    damaged.write_bytes(stream)
    with pytest.raises(VmdeltaError, match="checksum"):
        send(server, damaged, name="damaged")
    assert not (server.config.output / "damaged").exists()


def test_what_is_not_a_stream_form_overlay_never_reaches_the_server(vm, server, tmp_path: Path) -> None:
    not_overlay = tmp_path / "notes.txt"
    not_overlay.write_bytes(b"not an overlay at all\n" * 100)
    with pytest.raises(FormatError, match="not a vmdelta overlay"):
        send(server, not_overlay, name="x")
    with open(vm["file_form"], "rb") as f, pytest.raises(FormatError, match="needs the stream form"):
        send_overlay(Path("standard input"), *server.address, token=TOKEN, stream=f, timeout=20)
    with pytest.raises(FormatError, match="too short"):
        send_overlay(Path("standard input"), *server.address, token=TOKEN, stream=io.BytesIO(b""), timeout=20)
    assert list(server.config.output.iterdir()) == []


def test_stopping_breaks_off_connections_in_flight_and_closes_the_socket(vm, tmp_path: Path) -> None:
    stream = vm["stream_form"].read_bytes()
    for server in serving(vm, tmp_path / "out"):
        sock = raw_client(server, "inflight")
        with sock:
            send_chunk(sock, stream[: prologue_end(stream)])
            assert read_line(sock)["status"] == "ready"
            send_chunk(sock, stream[prologue_end(stream) : len(stream) // 2])
            server.stop()
        assert list((tmp_path / "out").iterdir()) == []
        with pytest.raises(OSError):
            socket.create_connection(server.address, timeout=5).close()


# ------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("neither openssl nor cryptography to make a certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls(vm, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    for server in serving(vm, tmp_path / "out", tls_cert=cert, tls_key=key):
        answer = send(server, vm["file_form"], name="secure", tls=client_tls_context(cert))
        assert_rebuilt(vm, tmp_path / "out" / answer["target"])
        with pytest.raises(ConfigError, match="wrong token"):
            send(server, vm["file_form"], name="x", token="guess", tls=client_tls_context(cert))
        with pytest.raises(VmdeltaError, match="TLS"):  # a server it cannot check is not trusted
            send(server, vm["file_form"], name="y", tls=client_tls_context(None))


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


def test_send_exits_with_the_servers_error_kind(vm, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("VMDELTA_TOKEN", TOKEN)
    for server in serving(vm, tmp_path / "out", kinds=("memory",)):
        address = f"127.0.0.1:{server.address[1]}"
        assert main(["send", str(vm["file_form"]), address, "--name", "x"]) == BaseMismatchError.exit_code
        assert "no disk base" in capsys.readouterr().err
        monkeypatch.setenv("VMDELTA_TOKEN", "guess")
        assert main(["send", str(vm["file_form"]), address]) == ConfigError.exit_code


def test_serve_and_send_commands(vm, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    (tmp_path / "token").write_text(TOKEN + "\n")
    config.write_text(
        f'listen = "127.0.0.1:0"\noutput = "out"\ntoken_file = "token"\ntimeout = 5\ncache_dir = "{vm["cache"]}"\n'
        f'[[bases]]\nkind = "memory"\npath = "{vm["memory_base"]}"\n'
        f'[[bases]]\nkind = "disk"\npath = "{vm["disk_base"]}"\n'
    )
    served = subprocess.Popen([*VMDELTA, "serve", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        assert served.stderr is not None
        said = []
        for line in served.stderr:
            said.append(line)
            if "listening on" in line:
                address = line.split("listening on ")[1].split()[0]
                break
        else:
            pytest.fail(f"serve did not start: {''.join(said)[-2000:]}")
        sent = subprocess.run(
            [*VMDELTA, "send", str(vm["file_form"]), address, "--name", "cli", "--token-file", str(tmp_path / "token"),
             "--json"],
            capture_output=True, timeout=120, text=True,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["target"] == "cli"
        assert_rebuilt(vm, tmp_path / "out" / "cli")
    finally:
        served.send_signal(signal.SIGTERM)
        _, rest = served.communicate(timeout=30)
    assert served.returncode == 128 + signal.SIGTERM, rest
    with pytest.raises(OSError):
        socket.create_connection(parse_address(address), timeout=5).close()


def test_serve_config_errors_are_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VMDELTA_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="no token"):
        load_serve_config(None, output=tmp_path, bases=[ServedBase("disk", tmp_path / "b")])
    (tmp_path / "s.toml").write_text('output = "o"\nlisten = "x:y"\n')
    with pytest.raises(ConfigError, match="port is not a number"):
        load_serve_config(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text('output = "o"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_serve_config(tmp_path / "s.toml")
    monkeypatch.setenv("VMDELTA_TOKEN", TOKEN)
    config = load_serve_config(None, output=tmp_path, bases=[ServedBase("disk", tmp_path / "b")], listen=":9")
    assert (config.host, config.port) == ("127.0.0.1", 9) and TOKEN not in repr(config)


def test_prologue_end_reads_the_record_length(vm) -> None:
    stream = vm["stream_form"].read_bytes()
    end = prologue_end(stream)
    assert end is not None and stream[end : end + 1] == b"F"  # the first frame's head follows
    assert prologue_end(stream[:10]) is None
    assert pack_hello(TOKEN, None).startswith(MAGIC)


def test_the_readme_config_is_one_serve_reads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme[readme.index('```toml\nlisten = "0.0.0.0') + len("```toml\n") :]
    (tmp_path / "serve.toml").write_text(block[: block.index("```")])
    (tmp_path / "token").write_text(TOKEN)
    config = load_serve_config(tmp_path / "serve.toml")
    assert (config.host, config.port, config.timeout) == ("0.0.0.0", 7478, 60)
    assert [(b.kind, b.path) for b in config.bases] == [
        ("memory", tmp_path / "base.mem"),
        ("disk", tmp_path / "base.img"),
    ]
    assert config.tls_key == tmp_path / "key.pem" and config.token == TOKEN
