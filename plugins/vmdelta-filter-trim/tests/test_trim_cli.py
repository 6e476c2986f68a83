"""End to end through the CLI: create with the filter, inspect the drops, apply, --strict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.plugin import map_readonly
from vmdelta_core.testing import main

pytestmark = pytest.mark.fixtures
UNIT = 4096


def test_trim_overlay_rebuilds_the_dropped_units_from_the_base(fixture_set: Path, tmp_path: Path, capsys) -> None:
    base, modified, trace = fixture_set / "base.img", fixture_set / "modified.img", fixture_set / "trim-trace.log"
    overlay = tmp_path / "vm.overlay"
    assert (
        main(["create", "-q", "-o", str(overlay), "--disk", str(base), str(modified), "--filter", f"trim:{trace}"]) == 0
    )
    capsys.readouterr()
    assert main(["inspect", "--json", str(overlay)]) == 0
    metadata = json.loads(capsys.readouterr().out)["metadata"]
    (entry,) = metadata["images"][0]["filters"]
    assert entry["name"] == "trim" and entry["reason"] == "trim" and entry["dropped"] == 2729
    assert entry["input_fingerprint"].startswith("xxh3")
    assert entry["details"]["discards"] == 183

    out = tmp_path / "rebuilt.img"
    assert main(["apply", "-q", str(overlay), "--disk", str(base), str(out)]) == 0
    b = map_readonly(base)[0].reshape(-1, UNIT)
    m = map_readonly(modified)[0].reshape(-1, UNIT)
    r = map_readonly(out)[0].reshape(-1, UNIT)
    from_base = np.flatnonzero((r != m).any(axis=1))
    assert from_base.size == 2729
    assert np.array_equal(r[from_base], b[from_base])
    # every unit rebuilt from the base lies in a trim request of the trace
    trimmed = np.zeros(len(m), dtype=bool)
    for line in trace.read_text().splitlines():
        start = int(line.split(".from = ")[1].split(",")[0])
        length = int(line.split(".len = ")[1].split(",")[0])
        trimmed[start // UNIT : (start + length) // UNIT] = True
    assert trimmed[from_base].all()

    refused = tmp_path / "strict.img"
    assert main(["apply", "-q", "--strict", str(overlay), "--disk", str(base), str(refused)]) != 0
    assert not refused.exists()
    assert "trim dropped 2729" in capsys.readouterr().err
