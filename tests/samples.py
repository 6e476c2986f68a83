"""Small image pairs with every kind of change, for tests and golden files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

UNIT = 4096


def write_pair(folder: Path, name: str, base: np.ndarray, modified: np.ndarray) -> tuple[Path, Path]:
    b, m = folder / f"{name}.base", folder / f"{name}.modified"
    b.write_bytes(base.tobytes())
    m.write_bytes(modified.tobytes())
    return b, m


def sample_pair(seed: int = 0, units: int = 64, grow: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A base with text-like and random units, and a modified copy with every kind of change."""
    rng = np.random.default_rng(seed)
    text = np.frombuffer((b"vmdelta sample text, a little repetitive; " * 200)[:UNIT], dtype=np.uint8)
    base = np.zeros(units * UNIT, dtype=np.uint8)
    for u in range(units):
        kind = u % 4
        if kind == 1:
            base[u * UNIT : (u + 1) * UNIT] = rng.integers(0, 256, UNIT, dtype=np.uint8)
        elif kind == 2:
            base[u * UNIT : (u + 1) * UNIT] = np.roll(text, u)
    modified = np.concatenate([base, rng.integers(0, 256, grow, dtype=np.uint8)])
    view = modified[: units * UNIT].reshape(units, UNIT)
    view[1] = 0  # data -> zero
    view[4] = view[9]  # same as another base unit
    view[8, 100:110] ^= 0xFF  # a small edit
    view[12] = rng.integers(0, 256, UNIT, dtype=np.uint8)  # new data
    view[16] = view[12]  # duplicated within the modified
    view[20] = view[13]  # moved
    return base, modified
