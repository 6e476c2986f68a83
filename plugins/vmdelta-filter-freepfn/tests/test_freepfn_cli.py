"""End to end through the CLI on raw pc.ram files: create with freepfn, inspect, apply, --strict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from freepfn_helpers import pfn_set

from vmdelta_core.plugin import map_readonly
from vmdelta_core.testing import main

UNIT = 4096


@pytest.mark.fixtures
def test_freepfn_overlay_rebuilds_free_pages_from_the_base(fixture_set: Path, tmp_path: Path, capsys) -> None:
    folder = fixture_set / "variants" / "qemu-7.2-ignore-shared"
    base, modified, free = folder / "base-ram.raw", folder / "modified-ram.raw", folder / "free-pfns-B.txt"
    overlay = tmp_path / "vm.overlay"
    args = ["create", "-q", "-o", str(overlay), "--memory", str(base), str(modified), "--memory-format", "file"]
    assert main([*args, "--filter", f"freepfn:{free}"]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(overlay)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["metadata"]["images"][0]["filters"]
    assert entry["name"] == "freepfn" and entry["reason"] == "free-page" and entry["dropped"] == 5121
    assert entry["details"]["free_pages"] == 5224

    out = tmp_path / "rebuilt.raw"
    assert main(["apply", "-q", str(overlay), "--memory", str(base), str(out)]) == 0
    b = map_readonly(base)[0].reshape(-1, UNIT)
    m = map_readonly(modified)[0].reshape(-1, UNIT)
    r = map_readonly(out)[0].reshape(-1, UNIT)
    from_base = np.flatnonzero((r != m).any(axis=1))
    assert from_base.size == 5121 and np.array_equal(r[from_base], b[from_base])
    assert set(from_base.tolist()) <= pfn_set(free)

    assert main(["apply", "-q", "--strict", str(overlay), "--memory", str(base), str(tmp_path / "s.raw")]) != 0


@pytest.fixture
def small_guest(tmp_path: Path) -> list[str]:
    """``create`` arguments for a 1 MiB guest whose pages 8-11 changed."""
    base = np.zeros(1 << 20, dtype=np.uint8)
    modified = base.copy()
    modified[8 * UNIT : 12 * UNIT] = 7
    base.tofile(tmp_path / "base.raw")
    modified.tofile(tmp_path / "modified.raw")
    memory = ["--memory", str(tmp_path / "base.raw"), str(tmp_path / "modified.raw"), "--memory-format", "file"]
    return ["create", "-q", "-o", str(tmp_path / "vm.overlay"), *memory]


def test_format_option_on_the_command_line(small_guest: list[str], tmp_path: Path, capsys) -> None:
    flags = np.zeros(256, dtype="<u8")
    flags[[8, 9]] = 1 << 10
    dump = tmp_path / "kpageflags"
    dump.write_bytes(flags.tobytes())
    args = [*small_guest, "--filter", f"freepfn:{dump}"]
    assert main([*args, "--filter-option", "freepfn.format=kpageflags"]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(tmp_path / "vm.overlay")]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["metadata"]["images"][0]["filters"]
    assert entry["dropped"] == 2 and entry["details"]["input_format"] == "kpageflags"
    assert main([*args, "--filter-option", "freepfn.format=ranges"]) == 3
    assert "is not a text PFN list" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (f"{2**63} 1\n", 2, f"line 1: free PFN range {2**63}+1 is not guest RAM (guest RAM is PFNs 0-255)"),
        (f"{2**52 + 8} 1\n", 2, f"line 1: free PFN range {2**52 + 8}+1 is not guest RAM"),
        ("8 1152921504606846976\n", 2, "line 1: free PFN range 8+1152921504606846976 is not guest RAM"),
        (np.random.default_rng(48).bytes(4096), 3, "is neither a text PFN list"),
    ],
)
def test_hostile_lists_end_in_one_line(
    small_guest: list[str], tmp_path: Path, capsys, content: str | bytes, status: int, message: str
) -> None:
    free = tmp_path / "free.txt"
    free.write_bytes(content.encode() if isinstance(content, str) else content)
    assert main([*small_guest, "--filter", f"freepfn:{free}"]) == status
    err = capsys.readouterr().err
    assert err.startswith("vmdelta: error: freepfn: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "vm.overlay").exists()
