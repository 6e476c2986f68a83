from __future__ import annotations

from pathlib import Path

import pytest

from vmdelta_core.testing import real_fixtures


@pytest.fixture(scope="session")
def fixtures() -> Path:
    found = real_fixtures()
    if found is None:
        pytest.skip("real QEMU fixtures are not available here")
    return found
