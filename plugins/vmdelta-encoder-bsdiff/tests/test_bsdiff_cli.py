"""End to end through the ``vmdelta`` command: create with this encoder, inspect, apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdelta_core.testing import check_encoder_end_to_end

ENCODER = "bsdiff"


@pytest.mark.parametrize("policy", ["fixed", "first-smaller", "best"])
def test_create_inspect_apply(tmp_path: Path, policy: str) -> None:
    check_encoder_end_to_end(ENCODER, tmp_path, policy)
