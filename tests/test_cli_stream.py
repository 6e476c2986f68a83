"""The stream form on the command line: ``create -o -`` into a pipe, ``apply -`` and ``inspect -``
from one, ``convert`` between the forms; a stream cut short or damaged leaves no output."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from samples import sample_pair, write_pair

from vmdelta_core.cli import main
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.stream import StreamReader

VMDELTA = [sys.executable, "-m", "vmdelta_core"]


@pytest.fixture
def pairs(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """A memory pair and a grown disk pair, read by the plain-file source."""
    return {
        "memory": write_pair(tmp_path, "memory", *sample_pair(seed=1, units=48)),
        "disk": write_pair(tmp_path, "disk", *sample_pair(seed=2, units=40, grow=3000)),
    }


def create_argv(pairs: dict[str, tuple[Path, Path]], output: str, cache: Path) -> list[str]:
    return [
        "create", "-o", output, "--cache-dir", str(cache),
        "--memory", *map(str, pairs["memory"]), "--disk", *map(str, pairs["disk"]),
    ]  # fmt: skip


def apply_argv(pairs: dict[str, tuple[Path, Path]], overlay: str, outs: Path, cache: Path) -> list[str]:
    return [
        "apply", overlay, "--cache-dir", str(cache),
        "--memory", str(pairs["memory"][0]), str(outs / "memory.out"),
        "--disk", str(pairs["disk"][0]), str(outs / "disk.out"),
    ]  # fmt: skip


def test_create_into_a_pipe_and_apply_from_it_rebuild_every_image(pairs, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    outs = tmp_path / "outs"
    outs.mkdir()
    maker = subprocess.Popen(
        [*VMDELTA, *create_argv(pairs, "-", cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    applier = subprocess.run(
        [*VMDELTA, *apply_argv(pairs, "-", outs, cache)], stdin=maker.stdout, capture_output=True, timeout=120
    )
    assert maker.stdout is not None
    maker.stdout.close()
    assert maker.stderr is not None
    with maker.stderr:
        report = maker.stderr.read().decode()
    assert maker.wait(timeout=60) == 0 and applier.returncode == 0, applier.stderr.decode()
    assert "wrote the overlay to standard output" in report  # the report kept off the overlay
    assert (outs / "memory.out").read_bytes() == pairs["memory"][1].read_bytes()
    assert (outs / "disk.out").read_bytes() == pairs["disk"][1].read_bytes()


def test_standard_output_holds_the_overlay_alone_and_inspect_reads_it(pairs, tmp_path: Path) -> None:
    made = subprocess.run(
        [*VMDELTA, *create_argv(pairs, "-", tmp_path / "c"), "--json"], capture_output=True, timeout=120
    )
    assert made.returncode == 0
    reader = StreamReader(io.BytesIO(made.stdout), "stdout")
    while reader.next_frame() is not None:
        pass
    assert [image["name"] for image in reader.metadata["images"]] == ["memory", "disk0"]
    assert b'"size"' in made.stderr  # --json went to standard error
    shown = subprocess.run([*VMDELTA, "inspect", "--json", "-"], input=made.stdout, capture_output=True, timeout=60)
    assert shown.returncode == 0 and b'"form": "stream"' in shown.stdout


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_a_stream_cut_short_leaves_no_output(pairs, tmp_path: Path, keep: float) -> None:
    cache = tmp_path / "cache"
    whole = subprocess.run([*VMDELTA, *create_argv(pairs, "-", cache), "-q"], capture_output=True, timeout=120).stdout
    outs = tmp_path / "outs"
    outs.mkdir()
    cut = whole[: int(len(whole) * keep)]
    done = subprocess.run([*VMDELTA, *apply_argv(pairs, "-", outs, cache)], input=cut, capture_output=True, timeout=120)
    assert done.returncode in (3, 4) and done.stderr.count(b"\n") == 1, done.stderr
    assert b"cut short" in done.stderr
    assert sorted(p.name for p in outs.iterdir()) == []


def test_a_damaged_stream_leaves_no_output(pairs, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    whole = bytearray(subprocess.run([*VMDELTA, *create_argv(pairs, "-", cache), "-q"], capture_output=True).stdout)
    whole[len(whole) // 2] ^= 0x40
    outs = tmp_path / "outs"
    outs.mkdir()
    done = subprocess.run([*VMDELTA, *apply_argv(pairs, "-", outs, cache)], input=bytes(whole), capture_output=True)
    assert done.returncode in (3, 4) and done.stderr.count(b"\n") == 1 and not list(outs.iterdir())


def test_convert_is_byte_exact_both_ways(pairs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay = tmp_path / "vm.vmdo"
    assert main([*create_argv(pairs, str(overlay), tmp_path / "c"), "-q"]) == 0
    assert main(["convert", str(overlay), str(tmp_path / "vm.vmds")]) == 0
    assert "the stream form" in " ".join(capsys.readouterr().out.split())
    with OverlayReader(tmp_path / "vm.vmds") as reader:
        assert reader.stream_form
    assert main(["convert", "-q", str(tmp_path / "vm.vmds"), str(tmp_path / "back.vmdo")]) == 0
    assert (tmp_path / "back.vmdo").read_bytes() == overlay.read_bytes()
    # the stream form applies from a file as well as the file form does
    outs = tmp_path / "outs"
    outs.mkdir()
    assert main([*apply_argv(pairs, str(tmp_path / "vm.vmds"), outs, tmp_path / "c"), "-q"]) == 0
    assert (outs / "disk.out").read_bytes() == pairs["disk"][1].read_bytes()


def test_convert_never_writes_over_its_input(tmp_path: Path, golden_dir: Path, capsys) -> None:
    copy = tmp_path / "o.vmdo"
    copy.write_bytes((golden_dir / "overlay-zstd.vmdo").read_bytes())
    assert main(["convert", str(copy), str(copy)]) == 2
    assert "same file as an input" in capsys.readouterr().err
    assert copy.read_bytes() == (golden_dir / "overlay-zstd.vmdo").read_bytes()


def test_a_file_form_overlay_on_standard_input_says_to_convert_it(pairs, tmp_path: Path, golden_dir: Path) -> None:
    outs = tmp_path / "outs"
    outs.mkdir()
    done = subprocess.run(
        [*VMDELTA, *apply_argv(pairs, "-", outs, tmp_path / "c")],
        input=(golden_dir / "overlay-zstd.vmdo").read_bytes(),
        capture_output=True,
    )
    assert done.returncode == 3 and b"vmdelta convert" in done.stderr and not list(outs.iterdir())


def test_binary_output_is_never_written_to_a_terminal(pairs, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main([*create_argv(pairs, "-", tmp_path / "c"), "-q"]) == 2
    assert "refusing to write the overlay to a terminal" in capsys.readouterr().err
