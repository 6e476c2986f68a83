"""What every integration test shares: a cache of base indexes of its own (the real captures come
from the ``realistic`` fixture of ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
