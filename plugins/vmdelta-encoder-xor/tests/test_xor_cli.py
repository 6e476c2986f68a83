"""End to end through the ``vmdelta`` command: create with this encoder, inspect, apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdelta_core.testing import check_encoder_end_to_end, main

ENCODER = "xor"


@pytest.mark.parametrize("policy", ["fixed", "first-smaller", "best"])
def test_create_inspect_apply(tmp_path: Path, policy: str) -> None:
    check_encoder_end_to_end(ENCODER, tmp_path, policy)


@pytest.mark.fixtures
@pytest.mark.slow
def test_best_policy_is_smaller_than_raw_on_the_real_capture(tmp_path: Path) -> None:
    """The recommended setting (xor under ``best``) against raw units only, same dedup, same codec."""
    from vmdelta_core.testing import real_fixtures

    found = real_fixtures()
    if found is None:
        pytest.skip("the real QEMU fixtures are not available")
    ram = found / "variants" / "qemu-7.2-ignore-shared"
    images = [
        "--memory",
        str(ram / "base-ram.raw"),
        str(ram / "modified-ram.raw"),
        "--disk",
        str(found / "base.img"),
        str(found / "modified.img"),
    ]
    sizes = {}
    for label, options in {"raw": ["--encoder", "raw"], "xor": ["--encoder", "xor", "--policy", "best"]}.items():
        overlay = tmp_path / f"{label}.vmd"
        assert main(["create", "-o", str(overlay), *images, *options]) == 0
        sizes[label] = overlay.stat().st_size
    assert sizes["xor"] < sizes["raw"]
