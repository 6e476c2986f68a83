"""Base indexes: per-unit hashes and the fingerprint of a base image, computed once and cached.

An index proposes dedup matches (``np.searchsorted`` over the sorted hashes); the pipeline then
compares bytes, so a hash collision can never corrupt a VM. The fingerprint (the
:class:`ImageDigest` of the whole image) is what ``apply`` checks a base against before it writes
anything.

Indexes are cached in ``BASE.vmdidx`` beside the base when that file exists (``vmdelta index
--beside``), else in the cache folder (``--cache-dir``, ``$VMDELTA_CACHE_DIR``,
``$XDG_CACHE_HOME/vmdelta`` or ``~/.cache/vmdelta``), keyed by the file's identity and
modification time, and rebuilt whenever the base changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import xxhash

from vmdelta_core.components import SourceImage
from vmdelta_core.errors import VmdeltaError
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.digest import ImageDigest

__all__ = [
    "BaseIndex",
    "cache_folder",
    "image_digest",
    "load_or_build_index",
    "unit_hashes",
]

_MAGIC = b"VMDIDX01"
_VERSION = 3  # 3: fingerprints are chunked digests
_CHUNK_UNITS = 4096  # 16 MiB of 4 KiB units per step
ProgressFn = Callable[[int], None]


def unit_hashes(units: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """XXH3-64 of each row of a ``(n, unit)`` uint8 array (zero rows get the zero unit's hash
    without being hashed), or of its rows ``rows`` only, hashed where they lie (not copied)."""
    unit = units.shape[1]
    units = np.ascontiguousarray(units)
    if rows is None:
        out = np.full(units.shape[0], xxhash.xxh3_64_intdigest(bytes(unit)), dtype=np.uint64)
        rows = np.flatnonzero(_nonzero_rows(units))
        out[rows] = _hash_rows(units, rows)
        return out
    return _hash_rows(units, rows)


def _hash_rows(units: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """XXH3-64 of the rows ``rows`` of the C-contiguous ``units``."""
    unit = units.shape[1]
    if not rows.size:
        return np.zeros(0, dtype=np.uint64)
    digest = xxhash.xxh3_64_intdigest
    flat = memoryview(units).cast("B")
    starts = (rows * unit).tolist()
    return np.fromiter((digest(flat[s : s + unit]) for s in starts), dtype=np.uint64, count=len(starts))


def _nonzero_rows(units: np.ndarray) -> np.ndarray:
    if units.shape[1] % 8 == 0 and units.flags.c_contiguous:
        return units.view(np.uint64).any(axis=1)
    return units.any(axis=1)


def hole_runs(image: SourceImage, unit: int, count: int) -> np.ndarray:
    """Runs ``[first, end)`` of units that lie wholly in the image's holes, of at least a chunk
    (16 MiB): shorter holes are cheaper read (as zeros) than stepped around.

    Runs, not a flag per unit: an image of a terabyte costs what its holes are, not its size.
    """
    holes = np.asarray(image.holes, dtype=np.int64).reshape(-1, 2)
    first = -(-holes[:, 0] // unit)
    stop = holes[:, 0] + holes[:, 1]
    # a hole that runs to the end covers the short last unit too
    last = np.where(stop >= image.size, count, np.minimum(stop // unit, count))
    keep = last - first >= _CHUNK_UNITS
    return _merged(np.stack([first[keep], last[keep]], axis=1))


def _merged(runs: np.ndarray) -> np.ndarray:
    """Sorted runs with touching or overlapping ones joined."""
    if runs.shape[0] < 2:
        return runs.reshape(-1, 2)
    runs = runs[np.argsort(runs[:, 0], kind="stable")]
    ends = np.maximum.accumulate(runs[:, 1])
    starts_new = np.concatenate(([True], runs[1:, 0] > ends[:-1]))
    group = np.cumsum(starts_new) - 1
    out = np.empty((int(group[-1]) + 1, 2), dtype=np.int64)
    out[:, 0] = runs[starts_new, 0]
    out[:, 1] = np.maximum.reduceat(runs[:, 1], np.flatnonzero(starts_new))
    return out


def intersect_runs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The units in both sets of sorted, disjoint runs, as runs."""
    if not a.shape[0] or not b.shape[0]:
        return np.zeros((0, 2), dtype=np.int64)
    points = np.unique(np.concatenate([a.ravel(), b.ravel()]))
    lo = points[:-1]

    def inside(runs: np.ndarray) -> np.ndarray:
        k = np.searchsorted(runs[:, 0], lo, side="right") - 1
        return (k >= 0) & (runs[np.maximum(k, 0), 1] > lo)

    both = inside(a) & inside(b)
    return _merged(np.stack([lo[both], points[1:][both]], axis=1))


def iter_chunks(
    image: SourceImage, unit: int, holes: np.ndarray, start: int, stop: int
) -> Iterator[tuple[int, int, bool]]:
    """``(first unit, end unit, is a hole)`` over units ``[start, stop)``: data in steps of at most
    16 MiB, each hole run of ``holes`` (from :func:`hole_runs`) in one step, however long."""
    pos = start
    for first, end in holes.tolist():
        first, end = max(first, pos), min(end, stop)
        if end <= first:
            continue
        while pos < first:
            step = min(pos + _CHUNK_UNITS, first)
            yield pos, step, False
            pos = step
        yield first, end, True
        pos = end
    while pos < stop:
        step = min(pos + _CHUNK_UNITS, stop)
        yield pos, step, False
        pos = step


def image_digest(
    image: SourceImage,
    unit: int = 4096,
    progress: ProgressFn | None = None,
    *,
    replaced: tuple[SourceImage, np.ndarray] | None = None,
    kind: type[ImageDigest] = ImageDigest,
) -> str:
    """Digest of an opened image (holes are not read).

    :param replaced: ``(base, unit indices)``: digest the image as it is with those units taken
        from ``base`` instead (zero-padded past its end): the image apply rebuilds when filters
        dropped them.
    """
    return _scan(image, unit, want_hashes=False, progress=progress, replaced=replaced, kind=kind)[0]


def _scan(
    image: SourceImage,
    unit: int,
    *,
    want_hashes: bool,
    progress: ProgressFn | None = None,
    replaced: tuple[SourceImage, np.ndarray] | None = None,
    kind: type[ImageDigest] = ImageDigest,
) -> tuple[str, np.ndarray, np.ndarray]:
    size = image.size
    count = -(-size // unit)
    full = size // unit
    holes = hole_runs(image, unit, count)
    digest = kind()
    # only units with data are indexed: zero units are found by looking, and a mostly empty
    # 64 GiB disk then costs an index of what it holds, not of its size
    found_units: list[np.ndarray] = []
    found_hashes: list[np.ndarray] = []
    data = image.data
    swap = np.zeros(0, dtype=np.int64) if replaced is None else np.asarray(replaced[1], dtype=np.int64)
    for first, end, is_hole in iter_chunks(image, unit, holes, 0, count):
        lo, hi = first * unit, min(end * unit, size)
        inside = swap[np.searchsorted(swap, first) : np.searchsorted(swap, end)]
        if inside.size:
            assert replaced is not None
            base, pos = replaced[0], lo
            for index in inside.tolist():
                a, b = index * unit, min(index * unit + unit, size)
                if is_hole:
                    digest.update_zeros(a - pos)
                else:
                    digest.update(data[pos:a])
                got = base.data[a : min(b, base.size)]
                digest.update(got)
                digest.update_zeros(b - a - got.shape[0])
                pos = b
            if is_hole:
                digest.update_zeros(hi - pos)
            else:
                digest.update(data[pos:hi])
        elif is_hole:
            digest.update_zeros(hi - lo)
        else:
            chunk = data[lo:hi]
            digest.update(chunk)
            if want_hashes:
                last_full = min(end, full)
                if last_full > first:
                    units = chunk[: (last_full - first) * unit].reshape(-1, unit)
                    rows = np.flatnonzero(_nonzero_rows(units))
                    found_units.append(first + rows)
                    found_hashes.append(unit_hashes(units[rows]))
        image.release(lo, hi)
        if progress is not None:
            progress(hi - lo)
    units_out = np.concatenate(found_units) if found_units else np.zeros(0, dtype=np.int64)
    hashes_out = np.concatenate(found_hashes) if found_hashes else np.zeros(0, dtype=np.uint64)
    return digest.hexdigest(), units_out.astype(np.int64), hashes_out


@attrs.define(eq=False)
class BaseIndex:
    """Hashes of the base image's full units that hold data, and the image's fingerprint.

    ``units`` (ascending unit numbers) and ``hashes`` are parallel arrays.
    """

    size: int
    unit_size: int
    fingerprint: str
    units: np.ndarray
    hashes: np.ndarray
    _sorted: np.ndarray | None = attrs.field(default=None, alias="sorted")
    _order: np.ndarray | None = attrs.field(default=None, alias="order")

    @classmethod
    def build(cls, image: SourceImage, unit: int, progress: ProgressFn | None = None) -> BaseIndex:
        fingerprint, units, hashes = _scan(image, unit, want_hashes=True, progress=progress)
        return cls(size=image.size, unit_size=unit, fingerprint=fingerprint, units=units, hashes=hashes)

    def _sorted_view(self) -> tuple[np.ndarray, np.ndarray]:
        if self._order is None:
            self._order = np.argsort(self.hashes, kind="stable")
            self._sorted = self.hashes[self._order]
        assert self._sorted is not None
        return self._sorted, self._order

    def lookup(self, queries: np.ndarray) -> np.ndarray:
        """For each query hash, the number of a base unit with that hash, or -1."""
        if self.hashes.size == 0 or queries.size == 0:
            return np.full(queries.shape[0], -1, dtype=np.int64)
        ordered, order = self._sorted_view()
        pos = np.minimum(np.searchsorted(ordered, queries), ordered.shape[0] - 1)
        hit = ordered[pos] == queries
        return np.where(hit, self.units[order[pos]], -1).astype(np.int64)

    # ----------------------------------------------------------------------------------------

    def save(self, path: Path, key: dict[str, Any]) -> None:
        header = json.dumps(
            {
                "version": _VERSION,
                "key": key,
                "size": self.size,
                "unit_size": self.unit_size,
                "fingerprint": self.fingerprint,
                "count": int(self.hashes.shape[0]),
            },
            sort_keys=True,
        ).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        with OutputSet([]) as outputs:
            pending = outputs.add(path)
            with open(pending.path, "wb") as f:
                f.write(_MAGIC + struct.pack("<I", len(header)) + header)
                f.write(self.units.astype("<i8").tobytes())
                f.write(self.hashes.astype("<u8").tobytes())
            outputs.commit()

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> BaseIndex | None:
        """The cached index at ``path`` if it is intact and was made for ``key``, else ``None``."""
        try:
            with open(path, "rb") as f:
                if f.read(8) != _MAGIC:
                    return None
                (length,) = struct.unpack("<I", f.read(4))
                if length > 1 << 20:
                    return None
                header = json.loads(f.read(length))
                if header.get("version") != _VERSION or header.get("key") != key:
                    return None
                count = int(header["count"])
                if not 0 <= count <= int(header["size"]) // int(header["unit_size"]):
                    return None
                raw = f.read(count * 16 + 1)
        except (OSError, ValueError, struct.error, KeyError, TypeError):
            return None
        if len(raw) != count * 16:
            return None
        units = np.frombuffer(raw[: count * 8], dtype="<i8").astype(np.int64)
        hashes = np.frombuffer(raw[count * 8 :], dtype="<u8").astype(np.uint64)
        if units.size and (
            units[0] < 0 or units[-1] >= int(header["size"]) // int(header["unit_size"]) or (np.diff(units) <= 0).any()
        ):
            return None
        return cls(
            size=int(header["size"]),
            unit_size=int(header["unit_size"]),
            fingerprint=str(header["fingerprint"]),
            units=units,
            hashes=hashes,
        )


def cache_folder(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("VMDELTA_CACHE_DIR"):
        return Path(os.environ["VMDELTA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vmdelta"


def index_key(path: Path, source: str, unit: int, options: dict[str, Any]) -> dict[str, Any]:
    st = os.stat(path)
    key: dict[str, Any] = {
        "path": str(Path(path).resolve()),
        "source": source,
        "unit": unit,
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        # a file edited in place with its mtime put back still has a new ctime, which no user
        # can set: the cached index is then rebuilt and a changed base is caught
        "ctime_ns": st.st_ctime_ns,
    }
    # files an option names (a raw RAM file) are part of the base too
    for name, value in sorted(options.items()):
        if isinstance(value, str) and os.path.exists(value):
            sub = os.stat(value)
            key[f"option:{name}"] = [
                str(Path(value).resolve()),
                sub.st_size,
                sub.st_mtime_ns,
                sub.st_ctime_ns,
                sub.st_ino,
            ]
        else:
            key[f"option:{name}"] = value
    return key


def beside_path(path: Path) -> Path:
    return Path(str(path) + ".vmdidx")


def load_or_build_index(
    path: Path,
    image: SourceImage,
    *,
    source: str,
    unit: int,
    options: dict[str, Any],
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    beside: bool = False,
) -> tuple[BaseIndex, bool]:
    """The index of ``image`` (opened from ``path``), from the cache or freshly built and cached.

    :returns: the index and whether it came from the cache.
    """
    key = index_key(path, source, unit, options)
    cached_name = xxhash.xxh3_128_hexdigest(json.dumps(key, sort_keys=True).encode()) + ".vmdidx"
    candidates = [beside_path(path), cache_folder(cache_dir) / cached_name]
    for candidate in candidates:
        index = BaseIndex.load(candidate, key)
        if index is not None and index.size == image.size and index.unit_size == unit:
            return index, True
    index = BaseIndex.build(image, unit, progress=progress)
    target = beside_path(path) if beside else candidates[1]
    with contextlib.suppress(OSError, VmdeltaError):  # a read-only cache only costs speed
        index.save(target, key)
    return index, False
