"""The command line: pairs in both directions, one-line errors, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from samples import sample_pair

from vmdelta_core.cli import main


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base, modified = sample_pair(seed=3, units=32)
    b, m = tmp_path / "base.img", tmp_path / "modified.img"
    b.write_bytes(base.tobytes())
    m.write_bytes(modified.tobytes())
    return b, m


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_apply_inspect(pair, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    b, m = pair
    overlay, out = tmp_path / "vm.overlay", tmp_path / "rebuilt.img"
    code, stdout, _ = run(capsys, "create", "-o", str(overlay), "--disk", str(b), str(m))
    assert code == 0 and "changed" in stdout and overlay.exists()
    code, stdout, _ = run(capsys, "apply", str(overlay), "--disk", str(b), str(out))
    assert code == 0 and "identical" in stdout
    assert out.read_bytes() == m.read_bytes()
    code, stdout, _ = run(capsys, "inspect", "--json", str(overlay))
    data = json.loads(stdout)
    assert code == 0 and data["metadata"]["images"][0]["kind"] == "disk"
    code, stdout, _ = run(capsys, "inspect", "--frames", str(overlay))
    assert code == 0 and "frames" in stdout


def test_errors_are_one_line_and_leave_no_output(pair, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    b, m = pair
    overlay, out = tmp_path / "vm.overlay", tmp_path / "rebuilt.img"
    assert run(capsys, "create", "-q", "-o", str(overlay), "--disk", str(b), str(m))[0] == 0
    out.write_bytes(b"the user's precious file")

    # wrong base
    code, _, err = run(capsys, "apply", str(overlay), "--disk", str(m), str(out))
    assert code == 5 and err.count("\n") == 1 and "not the base" in err
    # a flipped byte
    damaged = bytearray(overlay.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    bad = tmp_path / "bad.overlay"
    bad.write_bytes(bytes(damaged))
    code, _, err = run(capsys, "apply", str(bad), "--disk", str(b), str(out))
    assert code == 4 and err.count("\n") == 1 and "damaged" in err
    # not an overlay, missing file, wrong pairs
    code, _, err = run(capsys, "apply", str(b), "--disk", str(b), str(out))
    assert code == 3 and err.startswith("vmdelta: error:") and err.count("\n") == 1
    code, _, err = run(capsys, "apply", str(tmp_path / "nope"), "--disk", str(b), str(out))
    assert code != 0 and err.count("\n") == 1
    code, _, err = run(capsys, "apply", str(overlay), "--memory", str(b), str(out))
    assert code == 2 and "--disk" in err
    code, _, err = run(capsys, "create", "-o", str(tmp_path / "x"), "--disk", str(tmp_path / "missing"), str(m))
    assert code == 2 and "does not exist" in err and not (tmp_path / "x").exists()
    code, _, err = run(capsys, "create", "-o", str(tmp_path / "x"), "--disk", str(b), str(m), "--encoder", "nosuch")
    assert code == 6 and "no encoder named 'nosuch'" in err
    # the user's file is untouched and no temporary files are left
    assert out.read_bytes() == b"the user's precious file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.overlay",
        "base.img",
        "cache",
        "modified.img",
        "rebuilt.img",
        "vm.overlay",
    ]


def test_apply_refuses_to_overwrite_its_base(pair, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    b, m = pair
    overlay = tmp_path / "vm.overlay"
    run(capsys, "create", "-q", "-o", str(overlay), "--disk", str(b), str(m))
    before = b.read_bytes()
    code, _, err = run(capsys, "apply", str(overlay), "--disk", str(b), str(b))
    assert code == 2 and "overwrite" in err and b.read_bytes() == before


def test_run_pipeline_matches_flags(pair, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    b, m = pair
    (tmp_path / "p.toml").write_text(
        '[overlay]\noutput = "from-toml.overlay"\nlevel = 3\n\n'
        '[[images]]\nkind = "disk"\nbase = "base.img"\nmodified = "modified.img"\n'
    )
    assert run(capsys, "run", "-q", str(tmp_path / "p.toml"))[0] == 0
    assert (
        run(
            capsys, "create", "-q", "--level", "3", "-o", str(tmp_path / "from-flags.overlay"), "--disk", str(b), str(m)
        )[0]
        == 0
    )
    assert (tmp_path / "from-toml.overlay").read_bytes() == (tmp_path / "from-flags.overlay").read_bytes()


def test_bad_pipeline_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "p.toml").write_text('[overlay]\noutput = "x"\n[[images]]\nkind = "tape"\nbase = "a"\nmodified = "b"\n')
    code, _, err = run(capsys, "run", str(tmp_path / "p.toml"))
    assert code == 2 and "images/0/kind" in err and err.count("\n") == 1
    (tmp_path / "q.toml").write_text("not = [toml")
    code, _, err = run(capsys, "run", str(tmp_path / "q.toml"))
    assert code == 2 and "not valid TOML" in err


def test_plugins_and_demo(capsys) -> None:
    code, out, _ = run(capsys, "plugins", "--json")
    rows = json.loads(out)
    assert (
        code == 0
        and {"component": "raw", "kind": "encoder"}.items() <= next(r for r in rows if r["component"] == "raw").items()
    )
    code, out, _ = run(capsys, "demo", "--json")
    data = json.loads(out)
    assert code == 0 and data["identical"] and data["overlay_bytes"] < data["modified_bytes"]


def test_index_command(pair, tmp_path, capsys) -> None:
    b, _ = pair
    code, out, _ = run(capsys, "index", "--json", "--beside", str(b))
    first = json.loads(out)[0]
    assert code == 0 and not first["cached"] and Path(str(b) + ".vmdidx").exists()
    code, out, _ = run(capsys, "index", "--json", str(b))
    assert json.loads(out)[0]["cached"] and json.loads(out)[0]["fingerprint"] == first["fingerprint"]


def test_component_options_from_flags_and_pipelines(pair, tmp_path, capsys, monkeypatch) -> None:
    """Options reach the components, are recorded, and a wrong one is one clear error."""
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    b, m = pair
    code, _, err = run(
        capsys, "create", "-q", "-o", str(tmp_path / "x"), "--disk", str(b), str(m), "--encoder-option", "raw.level=3"
    )
    assert code == 2 and "encoder 'raw' takes no options" in err
    code, _, err = run(
        capsys,
        "create",
        "-q",
        "-o",
        str(tmp_path / "x"),
        "--disk",
        str(b),
        str(m),
        "--encoder-option",
        "nosuch.level=3",
    )
    assert code == 2 and "does not use" in err
    code, _, err = run(
        capsys, "create", "-q", "-o", str(tmp_path / "x"), "--disk", str(b), str(m), "--encoder-option", "broken"
    )
    assert code == 2 and "NAME.KEY=VALUE" in err
    code, _, err = run(
        capsys, "create", "-q", "-o", str(tmp_path / "x"), "--disk", str(b), str(m), "--filter-option", "trim.after=1"
    )
    assert code == 2 and "no --filter turns on" in err
    assert not (tmp_path / "x").exists()


def test_parse_option_values() -> None:
    from vmdelta_core.config import parse_option

    assert parse_option("xdelta3.level=9", "--x") == ("xdelta3", "level", 9)
    assert parse_option("xray.journal=ignore", "--x") == ("xray", "journal", "ignore")
    assert parse_option("a.b=true", "--x") == ("a", "b", True)
    assert parse_option('a.b="9"', "--x") == ("a", "b", "9")


def test_side_outputs_never_overwrite_inputs(pair, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    b, m = pair
    overlay = tmp_path / "vm.overlay"
    assert run(capsys, "create", "-q", "-o", str(overlay), "--memory", str(b), str(m))[0] == 0
    ram = tmp_path / "base-ram.raw"
    ram.write_bytes(b"base RAM")
    code, _, err = run(
        capsys, "apply", str(overlay), "--memory", str(b), str(tmp_path / "out.mem"), "--memory-ram", str(ram), str(ram)
    )
    assert code == 2 and "same file as an input" in err and ram.read_bytes() == b"base RAM"
    code, _, err = run(
        capsys,
        "apply",
        str(overlay),
        "--memory",
        str(b),
        str(tmp_path / "same"),
        "--memory-ram",
        str(ram),
        str(tmp_path / "same"),
    )
    assert code == 2 and "named twice" in err
    assert not (tmp_path / "out.mem").exists() and not (tmp_path / "same").exists()
