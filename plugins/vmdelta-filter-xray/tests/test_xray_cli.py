"""End to end through the CLI: create with xray, inspect the drops, apply, --strict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from xray_helpers import dumpe2fs_free

from vmdelta_core.plugin import map_readonly
from vmdelta_core.testing import main

pytestmark = pytest.mark.fixtures
UNIT = 4096


def test_xray_overlay_rebuilds_free_blocks_from_the_base(fixture_set: Path, tmp_path: Path, capsys) -> None:
    base, modified = fixture_set / "base.img", fixture_set / "modified.img"
    overlay = tmp_path / "vm.overlay"
    assert main(["create", "-q", "-o", str(overlay), "--disk", str(base), str(modified), "--filter", "xray"]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(overlay)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["metadata"]["images"][0]["filters"]
    assert entry["name"] == "xray" and entry["reason"] == "free-block" and entry["input"] is None
    assert entry["dropped"] == 2729 and entry["details"]["filesystems"][0]["free_blocks"] == 11243

    out = tmp_path / "rebuilt.img"
    assert main(["apply", "-q", str(overlay), "--disk", str(base), str(out)]) == 0
    b = map_readonly(base)[0].reshape(-1, UNIT)
    m = map_readonly(modified)[0].reshape(-1, UNIT)
    r = map_readonly(out)[0].reshape(-1, UNIT)
    from_base = np.flatnonzero((r != m).any(axis=1))
    assert from_base.size == 2729 and np.array_equal(r[from_base], b[from_base])
    assert set(from_base.tolist()) <= dumpe2fs_free(modified)
    # the rebuilt disk's filesystem has the same free blocks: only free space differs
    assert dumpe2fs_free(out) == dumpe2fs_free(modified)

    assert main(["apply", "-q", "--strict", str(overlay), "--disk", str(base), str(tmp_path / "s.img")]) != 0
