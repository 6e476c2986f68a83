"""End to end through the CLI on raw pc.ram files: create with freepfn, inspect, apply, --strict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from freepfn_helpers import pfn_set

from vmdelta_core.fileio import map_readonly

cli = pytest.importorskip("vmdelta_core.cli")
pytestmark = pytest.mark.fixtures
UNIT = 4096


def test_freepfn_overlay_rebuilds_free_pages_from_the_base(fixtures: Path, tmp_path: Path, capsys) -> None:
    folder = fixtures / "variants" / "qemu-7.2-ignore-shared"
    base, modified, free = folder / "base-ram.raw", folder / "modified-ram.raw", folder / "free-pfns-B.txt"
    overlay = tmp_path / "vm.overlay"
    args = ["create", "-q", "-o", str(overlay), "--memory", str(base), str(modified), "--memory-format", "file"]
    assert cli.main([*args, "--filter", f"freepfn:{free}"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", "--json", str(overlay)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["metadata"]["images"][0]["filters"]
    assert entry["name"] == "freepfn" and entry["reason"] == "free-page" and entry["dropped"] == 5121
    assert entry["details"]["free_pages"] == 5224

    out = tmp_path / "rebuilt.raw"
    assert cli.main(["apply", "-q", str(overlay), "--memory", str(base), str(out)]) == 0
    b = map_readonly(base)[0].reshape(-1, UNIT)
    m = map_readonly(modified)[0].reshape(-1, UNIT)
    r = map_readonly(out)[0].reshape(-1, UNIT)
    from_base = np.flatnonzero((r != m).any(axis=1))
    assert from_base.size == 5121 and np.array_equal(r[from_base], b[from_base])
    assert set(from_base.tolist()) <= pfn_set(free)

    assert cli.main(["apply", "-q", "--strict", str(overlay), "--memory", str(base), str(tmp_path / "s.raw")]) != 0
