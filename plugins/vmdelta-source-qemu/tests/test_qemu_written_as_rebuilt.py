"""``apply`` of a memory snapshot to a file writes the snapshot while its RAM is rebuilt (the
source's ``stream_artifact``), not in a pass of its own afterwards, and the file is the original
byte for byte; a mapped-ram snapshot, which is not written front to back, is made as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmdelta_source_qemu.source import QemuSource

from vmdelta_core.testing import main

pytestmark = pytest.mark.fixtures


@pytest.mark.parametrize("variant", ["", "variants/qemu-10.0-mapped-ram"])
def test_a_memory_snapshot_is_written_as_it_is_rebuilt(fixture_set: Path, tmp_path: Path, monkeypatch, variant) -> None:
    folder = fixture_set / variant
    base, modified = folder / "base.mem", folder / "modified.mem"
    overlay, out = tmp_path / "m.vmdo", tmp_path / "rebuilt.mem"
    assert main(["create", "-q", "-o", str(overlay), "--memory", str(base), str(modified)]) == 0
    made = []
    original = QemuSource.materialize
    monkeypatch.setattr(QemuSource, "materialize", lambda self, *a: made.append(a) or original(self, *a))
    assert main(["apply", "-q", str(overlay), "--memory", str(base), str(out)]) == 0
    assert out.read_bytes() == modified.read_bytes()
    assert len(made) == (1 if "mapped-ram" in variant else 0)
