"""End to end through the ``vmdelta`` command: create with this encoder, inspect, apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.cli import main

ENCODER = "bsdiff"


def _images(tmp_path: Path) -> tuple[Path, Path]:
    """A 1 MiB raw disk pair: text units with small edits, a few rewritten, a few new."""
    rng = np.random.default_rng(7)
    words = np.array(
        [w.encode() for w in ["alpha", "beta", "gamma", "delta", "kernel", "page", "cache", "inode", "block"]]
    )
    text = b" ".join(rng.choice(words, 200_000))[: 1 << 20]
    base = bytearray(text)
    modified = bytearray(text)
    for unit in range(0, 256, 3):  # small in-place edits
        for pos in rng.integers(0, 4096, 6):
            modified[unit * 4096 + int(pos)] ^= 0x20
    for unit in range(1, 256, 17):  # rewritten with other words
        modified[unit * 4096 : (unit + 1) * 4096] = b" ".join(rng.choice(words, 1000))[:4096]
    (tmp_path / "base.img").write_bytes(bytes(base))
    (tmp_path / "modified.img").write_bytes(bytes(modified))
    return tmp_path / "base.img", tmp_path / "modified.img"


@pytest.mark.parametrize("policy", ["fixed", "first-smaller", "best"])
def test_create_inspect_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str) -> None:
    base, modified = _images(tmp_path)
    overlay, rebuilt = tmp_path / "overlay.vmd", tmp_path / "rebuilt.img"
    assert (
        main(
            ["create", "-o", str(overlay), "--disk", str(base), str(modified), "--encoder", ENCODER, "--policy", policy]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", "--json", str(overlay)]) == 0
    meta = json.loads(capsys.readouterr().out)["metadata"]
    (image,) = meta["images"]
    used = image["statistics"]["encoders"]
    assert used[ENCODER]["units"] > 0, used
    assert ENCODER in {c["name"] for c in meta["components"] if c["kind"] == "encoder"}
    assert main(["apply", str(overlay), "--disk", str(base), str(rebuilt)]) == 0
    assert rebuilt.read_bytes() == modified.read_bytes()
