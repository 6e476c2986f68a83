"""Pytest fixtures for the tests of any vmdelta plugin, loaded by pytest through the ``pytest11``
entry point of vmdelta-core: a plugin's ``conftest.py`` holds only its own fixtures.

The real QEMU captures are large and unpacked on first use; a test that needs them asks for a
fixture here and is skipped where they are not available (see
:func:`vmdelta_core.testing.real_fixtures`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["fixture_set", "real_pairs"]


@pytest.fixture(scope="session")
def fixture_set() -> Path:
    """The folder of the real fixture set ``realistic-128``: ``base.img``/``modified.img``, the
    QEMU streams, trace logs, free page lists and ``variants/``."""
    from vmdelta_core.testing import real_fixtures

    found = real_fixtures()
    if found is None:
        pytest.skip("the real QEMU fixtures are not available here (shared/fixtures and zstd)")
    return found


@pytest.fixture(scope="session")
def real_pairs() -> dict[str, list[tuple[bytes, bytes]]]:
    """Changed 4 KiB units cut from the real captures, ``"memory"`` (guest RAM) and ``"disk"``
    (the ext4 disk), 300 of each (:func:`vmdelta_core.testing.real_unit_pairs`)."""
    from vmdelta_core.testing import real_unit_pairs

    pairs = real_unit_pairs(300)
    if pairs is None:
        pytest.skip("the real QEMU fixtures are not available here (shared/fixtures and zstd)")
    return pairs
