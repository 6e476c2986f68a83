from __future__ import annotations

import pytest

from vmdelta_core.testing import real_unit_pairs


@pytest.fixture(scope="session")
def real_pairs() -> dict[str, list[tuple[bytes, bytes]]]:
    """Changed 4 KiB units cut from the real captures: guest RAM and the ext4 disk."""
    pairs = real_unit_pairs(300)
    if pairs is None:
        pytest.skip("the real QEMU fixtures are not available")
    return pairs
