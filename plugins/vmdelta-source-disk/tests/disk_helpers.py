"""Helpers shared by the tests of the disk sources (a module name no other plugin uses)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

UNIT = 4096


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True)


def qemu_raw(image: Path, dest: Path) -> np.ndarray:
    """What QEMU reads from ``image``, as an array (the reference every read is checked against)."""
    qemu_img("convert", "-O", "raw", image, dest)
    return np.fromfile(dest, dtype=np.uint8)


def changed_units(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = min(a.shape[0], b.shape[0]) // UNIT
    diff = (a[: n * UNIT].reshape(n, UNIT).view(np.uint64) != b[: n * UNIT].reshape(n, UNIT).view(np.uint64)).any(1)
    return np.flatnonzero(diff).astype(np.int64)


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)
