from __future__ import annotations

from pathlib import Path

import pytest

from vmdelta_core.testing import real_fixtures

UNIT = 4096


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def realistic() -> Path:
    folder = real_fixtures("realistic-128")
    if folder is None:
        pytest.skip("real QEMU fixtures are not available here")
    return folder


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "schemas" / "golden"
