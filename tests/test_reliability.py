"""A careless or hostile user never loses a file: create and apply through the command line."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from samples import sample_pair

from vmdelta_core import Encoder, hookimpl
from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.cli import main
from vmdelta_core.errors import PluginError
from vmdelta_core.fuzzing import check_untrusted
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry
from vmdelta_core.testing import rewrite_overlay

UNIT = 4096


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def disks(tmp_path: Path) -> list[tuple[Path, Path]]:
    """Three disk pairs in a folder of their own."""
    folder = tmp_path / "in"
    folder.mkdir()
    pairs = []
    for k in range(3):
        base, modified = sample_pair(seed=k, units=24)
        b, m = folder / f"base{k}.img", folder / f"modified{k}.img"
        b.write_bytes(base.tobytes())
        m.write_bytes(modified.tobytes())
        pairs.append((b, m))
    return pairs


def create(capsys, overlay: Path, pairs: list[tuple[Path, Path]]) -> None:
    argv = ["create", "-q", "-o", str(overlay)]
    for b, m in pairs:
        argv += ["--disk", str(b), str(m)]
    code, _, err = run(capsys, *argv)
    assert code == 0, err


def apply_argv(overlay: Path, pairs: list[tuple[Path, Path]]) -> list[str]:
    argv = ["apply", "-q", str(overlay)]
    for b, out in pairs:
        argv += ["--disk", str(b), str(out)]
    return argv


def test_apply_never_replaces_a_device_a_fifo_or_a_symlink(disks, tmp_path: Path, capsys) -> None:
    overlay = tmp_path / "vm.overlay"
    create(capsys, overlay, disks[:1])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    target = tmp_path / "precious"
    target.write_bytes(b"precious")
    link.symlink_to(target)
    for output, what in ((Path("/dev/null"), "character device"), (fifo, "FIFO"), (link, "symbolic link")):
        code, _, err = run(capsys, *apply_argv(overlay, [(disks[0][0], output)]))
        assert code == 2 and err.count("\n") == 1 and what in err and str(output) in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert link.is_symlink() and target.read_bytes() == b"precious"


def test_create_never_overwrites_an_input_by_another_route(disks, tmp_path: Path, capsys) -> None:
    (b, m) = disks[0]
    (tmp_path / "alias").hardlink_to(m)
    before = m.read_bytes()
    for output in (tmp_path / "alias", tmp_path / "in" / ".." / "in" / m.name):
        code, _, err = run(capsys, "create", "-q", "-o", str(output), "--disk", str(b), str(m))
        assert code == 2 and "same file as an input" in err
    assert m.read_bytes() == before


def test_run_never_overwrites_its_pipeline(disks, tmp_path: Path, capsys) -> None:
    (b, m) = disks[0]
    pipeline = tmp_path / "vm.toml"
    text = f'[overlay]\noutput = "vm.toml"\n[[images]]\nkind = "disk"\nbase = "{b}"\nmodified = "{m}"\n'
    pipeline.write_text(text)
    code, _, err = run(capsys, "run", "-q", str(pipeline))
    assert code == 2 and "same file as an input" in err and pipeline.read_text() == text


def test_multi_image_apply_is_all_or_nothing(disks, tmp_path: Path, capsys) -> None:
    overlay = tmp_path / "vm.overlay"
    create(capsys, overlay, disks)
    out = tmp_path / "out"
    out.mkdir()
    outputs = [out / f"rebuilt{k}.img" for k in range(3)]
    for path in outputs:
        path.write_bytes(b"the user's old file")

    # the third image does not verify: its recorded digest is wrong
    with OverlayReader(overlay) as reader:
        meta = json.loads(json.dumps(reader.metadata))
    meta["images"][2]["digest"] = "xxh3-128:" + "0" * 32
    meta["images"][2]["artifact_digest"] = None
    bad = tmp_path / "bad.overlay"
    bad.write_bytes(rewrite_overlay(overlay.read_bytes(), metadata=meta))
    pairs = [(b, o) for (b, _), o in zip(disks, outputs, strict=True)]
    code, _, err = run(capsys, *apply_argv(bad, pairs))
    assert code == 4 and "disk2" in err
    # the third output's folder does not exist: refused before any work
    code, _, err = run(capsys, *apply_argv(overlay, [*pairs[:2], (disks[2][0], tmp_path / "gone" / "x.img")]))
    assert code == 2 and "does not exist" in err
    assert all(p.read_bytes() == b"the user's old file" for p in outputs)
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in outputs]  # no temporary left

    assert run(capsys, *apply_argv(overlay, pairs))[0] == 0
    assert all(o.read_bytes() == m.read_bytes() for (_, m), o in zip(disks, outputs, strict=True))
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in outputs]


@pytest.fixture
def big_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A pair large enough that apply is still at work a moment after it starts."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, 48 << 20, dtype=np.uint8)
    modified = base.copy()
    modified[::8192] ^= 1
    b, m = tmp_path / "big.base", tmp_path / "big.modified"
    b.write_bytes(base.tobytes())
    m.write_bytes(modified.tobytes())
    return b, m


def holds_files_in(pid: int, folder: Path) -> bool:
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return any(link.startswith(f"{folder}/") for link in links)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_leaves_nothing_behind(big_pair, tmp_path: Path, capsys, signum: int) -> None:
    b = big_pair[0]
    overlay = tmp_path / "vm.overlay"
    create(capsys, overlay, [big_pair])
    out = tmp_path / "out"
    out.mkdir()
    rebuilt = out / "rebuilt.img"
    rebuilt.write_bytes(b"old")
    env = {**os.environ, "VMDELTA_CACHE_DIR": str(tmp_path / "cache2")}  # an uncached base: more work
    argv = [sys.executable, "-m", "vmdelta_core.cli", *apply_argv(overlay, [(b, rebuilt)]), "--threads", "1"]
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    # wait until apply holds its (unnamed) output files, then stop it wherever it is
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline and not holds_files_in(process.pid, out):
        time.sleep(0.01)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("apply finished before the signal arrived")
    assert sorted(p.name for p in out.iterdir()) == ["rebuilt.img"] and rebuilt.read_bytes() == b"old"
    if signum != signal.SIGKILL:
        assert process.returncode == 128 + signum and "no output was written" in err and err.count("\n") == 1


class WrongEncoder(Encoder):
    """An encoder that loses the last byte of a unit: apply would refuse what it writes."""

    name = "lossy"

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        return [bytes(t[:-1]) for t in targets]

    def decode(self, bases, payloads, lengths) -> list[bytes]:
        return [bytes(p).ljust(n, b"\0") for p, n in zip(payloads, lengths, strict=True)]


class WrongPlugin:
    @hookimpl
    def vmdelta_register_encoders(self, register) -> None:
        register(WrongEncoder())


def test_create_checks_what_every_encoder_wrote(disks, tmp_path: Path) -> None:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(WrongPlugin(), name="wrong")
    b, m = disks[0]
    output = tmp_path / "vm.overlay"
    with pytest.raises(PluginError, match="encoder 'lossy' wrote a payload that does not decode to its unit"):
        create_overlay(
            CreateConfig(output=output, images=[ImageSpec("disk", b, m, encoders=("lossy",), policy="fixed")]),
            registry=Registry(pm),
        )
    assert not output.exists()


def test_apply_refuses_a_size_no_item_reaches(disks, tmp_path: Path, capsys) -> None:
    overlay = tmp_path / "vm.overlay"
    create(capsys, overlay, disks[:1])
    with OverlayReader(overlay) as reader:
        meta = json.loads(json.dumps(reader.metadata))
    meta["images"][0]["size"] = 1 << 50
    hostile = tmp_path / "huge.overlay"
    hostile.write_bytes(rewrite_overlay(overlay.read_bytes(), metadata=meta))
    out = tmp_path / "out.img"
    code, _, err = run(capsys, *apply_argv(hostile, [(disks[0][0], out)]))
    assert code == 3 and "implausible size" in err and not out.exists()


def test_a_disk_grown_with_zeros_still_round_trips(tmp_path: Path, capsys) -> None:
    base, modified = sample_pair(seed=5, units=24)
    b, m = tmp_path / "b.img", tmp_path / "m.img"
    b.write_bytes(base.tobytes())
    with open(m, "wb") as f:
        f.write(modified.tobytes())
        f.truncate(len(modified) + (64 << 20) + 512)  # grown by a sparse tail and a short unit
    overlay, out = tmp_path / "vm.overlay", tmp_path / "out.img"
    create(capsys, overlay, [(b, m)])
    assert run(capsys, *apply_argv(overlay, [(b, out)]))[0] == 0
    assert out.stat().st_size == m.stat().st_size and out.read_bytes() == m.read_bytes()


def test_a_base_edited_with_its_mtime_put_back_is_a_wrong_base(disks, tmp_path: Path, capsys) -> None:
    b, m = disks[0]
    overlay, out = tmp_path / "vm.overlay", tmp_path / "out.img"
    create(capsys, overlay, [(b, m)])
    assert run(capsys, *apply_argv(overlay, [(b, out)]))[0] == 0  # the base's index is cached now
    st = b.stat()
    with open(b, "r+b") as f:
        f.seek(3 * UNIT + 5)
        f.write(b"edited in place")
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    out.unlink()
    code, _, err = run(capsys, *apply_argv(overlay, [(b, out)]))
    assert code == 5 and "not the base" in err and not out.exists()


def test_disk_full_names_the_users_path(disks, tmp_path: Path, capsys) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mounting a file system needs privileges this run does not have")
    try:
        overlay = tmp_path / "vm.overlay"
        create(capsys, overlay, disks[:1])
        out = small / "rebuilt.img"
        code, _, err = run(capsys, *apply_argv(overlay, [(disks[0][0], out)]))
        assert code == 7 and err.count("\n") == 1
        assert f"{out}: no space left on the device" in err and "/proc/" not in err
        assert list(small.iterdir()) == []
        code, _, err = run(capsys, "create", "-q", "-o", str(small / "o"), "--disk", *map(str, disks[0]))
        assert code == 7 and str(small / "o") in err and list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_folder_refusing_writes_is_named_by_the_users_path(disks, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    # an immutable folder refuses new files even to root, as a folder of another user does
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available on this file system")
    try:
        overlay = tmp_path / "vm.overlay"
        create(capsys, overlay, disks[:1])
        out = locked / "rebuilt.img"
        code, _, err = run(capsys, *apply_argv(overlay, [(disks[0][0], out)]))
        assert code == 7 and err == f"vmdelta: error: cannot write {out}: operation not permitted\n"
        code, _, err = run(capsys, "create", "-q", "-o", str(locked / "o"), "--disk", *map(str, disks[0]))
        assert code == 7 and err == f"vmdelta: error: cannot write {locked / 'o'}: operation not permitted\n"
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert list(locked.iterdir()) == []


def test_an_envelope_frame_cannot_claim_more_than_its_index_length(disks, tmp_path: Path, capsys) -> None:
    overlay = tmp_path / "vm.overlay"
    create(capsys, overlay, disks[:1])
    # a zstd frame header claiming 8 GiB (single segment, 8-byte content size), then a raw block
    claim = b"\x28\xb5\x2f\xfd\xe0" + (8 << 30).to_bytes(8, "little") + b"\x01\x00\x00"
    hostile = tmp_path / "envelope.overlay"
    hostile.write_bytes(rewrite_overlay(overlay.read_bytes(), envelope=(0, claim, 100)))
    out = tmp_path / "out.img"
    code, _, err = check_untrusted(
        "apply of a hostile envelope", lambda: run(capsys, *apply_argv(hostile, [(disks[0][0], out)])), memory=64 << 20
    )
    assert code == 3 and "claims more bytes than the index gives it" in err and not out.exists()


def test_inputs_that_are_not_regular_files_are_refused(disks, tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block for ever
    b, m = disks[0]
    code, _, err = run(capsys, "create", "-q", "-o", str(tmp_path / "o"), "--disk", str(fifo), str(m))
    assert code == 2 and f"base disk {fifo} is a FIFO" in err
    code, _, err = run(capsys, "create", "-q", "-o", str(tmp_path / "o"), "--disk", str(b), "/dev/zero")
    assert code == 2 and "modified disk /dev/zero is a character device" in err
    code, _, err = run(capsys, "create", "-q", "-o", str(tmp_path / "o"), "--disk", str(b), str(tmp_path / "gone"))
    assert code == 2 and "does not exist" in err


def test_run_refuses_a_pipeline_that_is_not_a_regular_file(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "vm.toml"
    os.mkfifo(fifo)  # reading it would block for ever
    code, _, err = run(capsys, "run", "-q", str(fifo))
    assert code == 2 and f"pipeline {fifo} is a FIFO" in err
