from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vmdelta_core.testing import real_fixtures

UNIT = 4096


def changed_unit_pairs(base: Path, modified: Path, limit: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(base unit, modified unit) at the same offset, for a spread sample of the changed units."""
    b = np.memmap(base, dtype=np.uint8, mode="r")
    m = np.memmap(modified, dtype=np.uint8, mode="r")
    n = min(b.size, m.size) // UNIT
    changed = np.flatnonzero((b[: n * UNIT].reshape(n, UNIT) != m[: n * UNIT].reshape(n, UNIT)).any(axis=1))
    pick = np.sort(np.random.default_rng(seed).choice(changed, size=min(limit, changed.size), replace=False))
    return [(bytes(b[i * UNIT : (i + 1) * UNIT]), bytes(m[i * UNIT : (i + 1) * UNIT])) for i in pick]


@pytest.fixture(scope="session")
def real_pairs() -> dict[str, list[tuple[bytes, bytes]]]:
    """Changed 4 KiB units cut from the real captures: guest RAM and the ext4 disk."""
    found = real_fixtures()
    if found is None:
        pytest.skip("the real QEMU fixtures are not available")
    ram = found / "variants" / "qemu-7.2-ignore-shared"
    return {
        "memory": changed_unit_pairs(ram / "base-ram.raw", ram / "modified-ram.raw", 300),
        "disk": changed_unit_pairs(found / "base.img", found / "modified.img", 300),
    }
