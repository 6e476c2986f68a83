"""Flags the command line would otherwise drop without a word, and what it prints from untrusted
text: a second ``--memory`` replacing the first, ``--threads 0`` becoming "one per core", a file
name read as rich markup or carrying terminal escapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdelta_core.cli import main
from vmdelta_core.cli.output import console, printable
from vmdelta_core.cli.parser import build_parser


def parse_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["create", "-o", "x", "--memory", "a", "b", "--memory", "c", "d"],
            "vmdelta create: error: argument --memory: given twice (a b, then c d); give it once",
        ),
        (
            ["create", "-o", "x", "--memory", "a", "b", "--memory-ram", "r", "s", "--memory-ram", "t", "u"],
            "argument --memory-ram: given twice (r s, then t u); give it once",
        ),
        (
            ["apply", "o", "--memory", "a", "b", "--memory", "c", "d"],
            "vmdelta apply: error: argument --memory: given twice (a b, then c d)",
        ),
        (["apply", "o", "--memory-ram", "a", "b", "--memory-ram", "c", "d"], "argument --memory-ram: given twice"),
        (["apply", "o", "--disk-format", "qcow2", "--disk-format", "raw"], "argument --disk-format: given twice"),
        (["create", "-o", "x", "--disk-format", "raw", "--disk-format", "qcow2"], "argument --disk-format: given"),
        (["create", "-o", "x", "--memory-format", "qemu", "--memory-format", "file"], "argument --memory-format"),
        (["create", "-o", "x", "-o", "y"], "argument -o/--output: given twice (x, then y); give it once"),
        (["create", "-o", "x", "--output", "y"], "argument -o/--output: given twice (x, then y)"),
        (["create", "-o", "x", "--level", "3", "--level", "19"], "argument --level: given twice (3, then 19)"),
        (["create", "-o", "x", "--codec", "zstd", "--codec", "lzma"], "argument --codec: given twice"),
        (["create", "-o", "x", "--encoder", "xor", "--encoder", "raw"], "argument --encoder: given twice"),
        (["create", "-o", "x", "--policy", "best", "--policy", "fixed"], "argument --policy: given twice"),
        (["create", "-o", "x", "--unit-size", "4096", "--unit-size", "512"], "argument --unit-size: given twice"),
        (["create", "-o", "x", "--frame-size", "65536", "--frame-size", "65536"], "argument --frame-size"),
        (["create", "-o", "x", "--threads", "2", "--threads", "4"], "argument --threads: given twice (2, then 4)"),
        (["create", "-o", "x", "--cache-dir", "a", "--cache-dir", "b"], "argument --cache-dir: given twice"),
        (["index", "b", "--kind", "disk", "--kind", "memory"], "argument --kind: given twice (disk, then memory)"),
        (["index", "b", "--format", "raw", "--format", "qcow2"], "argument --format: given twice"),
        (["demo", "--keep", "a", "--keep", "b"], "argument --keep: given twice"),
    ],
)
def test_an_option_given_twice_is_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in parse_error(capsys, argv)


def test_options_meant_to_repeat_still_repeat() -> None:
    repeated = ["--disk", "a", "b", "--disk", "c", "d", "--filter", "trim:t", "--filter", "xray", "-q", "-q"]
    options = ["--encoder-option", "xor.mode=1", "--encoder-option", "xor.merge_gap=4"]
    args = build_parser().parse_args(["create", "-o", "x", *repeated, *options])
    assert args.disk == [["a", "b"], ["c", "d"]] and args.filter == ["trim:t", "xray"]
    assert args.encoder_option == ["xor.mode=1", "xor.merge_gap=4"] and args.quiet
    assert not hasattr(args, "_given")
    assert build_parser().parse_args(["apply", "o", "--disk", "a", "b", "--disk", "c", "d"]).disk == [
        ["a", "b"],
        ["c", "d"],
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "argument --threads: must be from 1 to 1024, got 0"),
        ("-2", "argument --threads: must be from 1 to 1024, got -2"),
        ("100000", "argument --threads: must be from 1 to 1024, got 100000"),
        ("two", "argument --threads: expected a number of threads, got 'two'"),
    ],
)
@pytest.mark.parametrize("command", [["create", "-o", "x"], ["apply", "o"], ["index", "b"], ["run", "p.toml"]])
def test_threads_out_of_range_is_refused(
    command: list[str], value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_error(capsys, [*command, "--threads", value]).endswith(message)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "argument --unit-size: must be a multiple of 512 from 512 to 65024, got 0"),
        ("-4096", "argument --unit-size: must be a multiple of 512 from 512 to 65024, got -4096"),
        ("1000", "argument --unit-size: must be a multiple of 512 from 512 to 65024, got 1000"),
        ("65536", "argument --unit-size: must be a multiple of 512 from 512 to 65024, got 65536"),
        ("4k", "argument --unit-size: expected a size in bytes, got '4k'"),
    ],
)
@pytest.mark.parametrize("command", [["create", "-o", "x"], ["index", "b"]])
def test_a_unit_size_no_overlay_can_have_is_refused(
    command: list[str], value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_error(capsys, [*command, "--unit-size", value]).endswith(message)


def test_threads_in_range_are_taken() -> None:
    assert build_parser().parse_args(["apply", "o", "--threads", "1"]).threads == 1
    assert build_parser().parse_args(["apply", "o", "--threads", "1024"]).threads == 1024


# --------------------------------------------------------------------------------------------
# what is printed
# --------------------------------------------------------------------------------------------


def test_printable_escapes_terminal_controls_and_undecodable_names() -> None:
    assert printable("disk0") == "disk0"
    assert printable("résumé [/x] :smile:") == "résumé [/x] :smile:"
    assert printable("a\x1b[31mred\x07") == "a\\x1b[31mred\\x07"
    assert printable("line\nbreak\r\t") == "line\\x0abreak\\x0d\\x09"
    assert printable("\x9b2J") == "\\x9b2J"
    assert printable(b"caf\xe9.img".decode(errors="surrogateescape")) == "caf\\udce9.img"
    assert printable(12) == "12"


def test_the_console_prints_text_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    console.print("wrote [/x] :smile: and [bold]this[/bold] \x1b[2J")
    out = capsys.readouterr().out
    assert out == "wrote [/x] :smile: and [bold]this[/bold] \\x1b[2J\n"


def test_create_reports_files_whose_names_look_like_markup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "[").mkdir()  # so that the paths hold "[/b]", a closing tag to rich
    b, m = tmp_path / "[" / "b]", tmp_path / "m\x1b[2J.img"
    b.write_bytes(bytes(8192))
    m.write_bytes(bytes(4096) + b"x" * 4096)
    overlay = tmp_path / "[" / "o]"
    assert main(["create", "-o", str(overlay), "--disk", str(b), str(m), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {overlay} (" in out and "\x1b" not in out
    assert main(["inspect", str(overlay)]) == 0
    assert "\x1b" not in capsys.readouterr().out
