"""Small image pairs with every kind of change, for tests and golden files."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def vm_overlays(folder: Path, *, seed: int, memory_units: int, grow: int = 3000) -> dict[str, Path]:
    """A memory pair and a disk pair (the modified disk ``grow`` bytes larger) in ``folder``, and
    their overlay in both forms (``vm.vmdo``, ``vm.vmds``), made with whatever is installed."""
    from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
    from vmdelta_core.overlay.container import OverlayReader
    from vmdelta_core.overlay.convert import convert_overlay

    memory = write_pair(folder, "memory", *sample_pair(seed=seed, units=memory_units))
    disk = write_pair(folder, "disk", *sample_pair(seed=seed + 1, units=40, grow=grow))
    create_overlay(
        CreateConfig(
            output=folder / "vm.vmdo",
            images=[ImageSpec("memory", *memory), ImageSpec("disk", *disk)],
            cache_dir=folder / "cache",
        )
    )
    with OverlayReader(folder / "vm.vmdo") as reader, open(folder / "vm.vmds", "wb") as f:
        convert_overlay(reader, f, stream=True)
    return {
        "memory_base": memory[0],
        "memory": memory[1],
        "disk_base": disk[0],
        "disk": disk[1],
        "file_form": folder / "vm.vmdo",
        "stream_form": folder / "vm.vmds",
        "cache": folder / "cache",
    }


@contextlib.contextmanager
def running_server(config: Any) -> Iterator[Any]:
    """A ``vmdelta serve`` of ``config`` (a ServeConfig) in a thread, stopped at the end."""
    from vmdelta_core.registry import default_registry
    from vmdelta_core.serve import BaseCatalog, OverlayServer

    registry = default_registry()
    server = OverlayServer(config, BaseCatalog.build(config.bases, registry, config.cache_dir), registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive()
