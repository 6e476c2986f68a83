"""``vmdelta index --image`` on a real QEMU capture: create and apply then map the kept RAM image
instead of parsing the base stream, and what they make is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmdelta_source_qemu.source import QemuSource

from vmdelta_core.testing import main

pytestmark = pytest.mark.fixtures


def test_a_kept_base_image_is_mapped_instead_of_parsed(fixture_set: Path, tmp_path: Path, monkeypatch) -> None:
    base, modified = fixture_set / "base.mem", fixture_set / "modified.mem"
    cache = tmp_path / "cache"
    parsed = tmp_path / "parsed.vmdo"
    assert (
        main(["create", "-q", "-o", str(parsed), "--memory", str(base), str(modified), "--cache-dir", str(cache)]) == 0
    )
    assert main(["index", "-q", "--kind", "memory", "--image", "--cache-dir", str(cache), str(base)]) == 0

    opened = []
    original = QemuSource.open

    def watched(self, path, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(path))
        return original(self, path, **kwargs)

    monkeypatch.setattr(QemuSource, "open", watched)
    kept = tmp_path / "kept.vmdo"
    assert main(["create", "-q", "-o", str(kept), "--memory", str(base), str(modified), "--cache-dir", str(cache)]) == 0
    out = tmp_path / "rebuilt.mem"
    assert main(["apply", "-q", str(kept), "--memory", str(base), str(out), "--cache-dir", str(cache)]) == 0
    assert opened == [modified]  # the base was never parsed again
    assert kept.read_bytes() == parsed.read_bytes()
    assert out.read_bytes() == modified.read_bytes()
