from __future__ import annotations

from pathlib import Path

import pytest

from vmdelta_core.testing import real_fixtures


@pytest.fixture(scope="session")
def fixture_set() -> Path:
    found = real_fixtures()
    if found is None:
        pytest.skip("real QEMU fixtures not available (../shared/fixtures and zstd)")
    return found
