"""The digest of an image, as overlays record it: of the rebuilt images, their artifacts and bases.

Recorded as ``"ALGORITHM:hex"``; :func:`digest_kind` finds the class that checks a recorded one,
so overlays written with the older whole-image digest still verify.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import numpy as np
import xxhash

from vmdelta_core.errors import ConfigError, FormatError
from vmdelta_core.fileio import data_extents

__all__ = ["ImageDigest", "WholeImageDigest", "digest_kind", "file_digest", "own_file_digest"]


class ImageDigest:
    """The digest of an image, fed in order: XXH3-128 over the XXH3-128 digests of its 16 MiB
    chunks and its length.

    A chunk of zeros has one known digest, so a run of zero chunks (a hole, or the sparse tail an
    overlay claims) costs 16 bytes of hashing per chunk instead of 16 MiB: verifying an image
    takes time in proportion to the data it holds, not to the size it claims.
    """

    ALGORITHM = "xxh3-128-chunked"
    CHUNK = 16 << 20
    _zeros = np.zeros(CHUNK, dtype=np.uint8)
    _zero_chunk = xxhash.xxh3_128_digest(_zeros)

    def __init__(self) -> None:
        self._outer = xxhash.xxh3_128()
        self._inner = xxhash.xxh3_128()
        self._fill = 0
        self._length = 0

    def update(self, data: np.ndarray | bytes | memoryview) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        pos, n = 0, len(view)
        while pos < n:
            take = min(n - pos, self.CHUNK - self._fill)
            self._inner.update(view[pos : pos + take])
            self._advance(take)
            pos += take

    def update_zeros(self, count: int) -> None:
        if self._fill and count:
            take = min(count, self.CHUNK - self._fill)
            self._inner.update(self._zeros[:take])
            self._advance(take)
            count -= take
        whole, rest = divmod(count, self.CHUNK)
        step = 1 << 16
        for done in range(0, whole, step):
            self._outer.update(self._zero_chunk * min(step, whole - done))
        self._length += whole * self.CHUNK
        if rest:
            self._inner.update(self._zeros[:rest])
            self._advance(rest)

    def _advance(self, count: int) -> None:
        self._fill += count
        self._length += count
        if self._fill == self.CHUNK:
            self._outer.update(self._inner.digest())
            self._inner.reset()
            self._fill = 0

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        if self._fill:
            outer.update(self._inner.digest())
        outer.update(self._length.to_bytes(8, "big"))
        return f"{self.ALGORITHM}:{outer.hexdigest()}"


class WholeImageDigest(ImageDigest):
    """XXH3-128 of the image's bytes in one stream: what overlays written before the chunked
    digest record. Still verified; zeros cost their full length to hash."""

    ALGORITHM = "xxh3-128"

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: np.ndarray | bytes | memoryview) -> None:
        self._h.update(data)

    def update_zeros(self, count: int) -> None:
        while count:
            step = min(count, self._zeros.shape[0])
            self._h.update(self._zeros[:step])
            count -= step

    def hexdigest(self) -> str:
        return f"{self.ALGORITHM}:{self._h.hexdigest()}"


_DIGESTS: dict[str, type[ImageDigest]] = {d.ALGORITHM: d for d in (ImageDigest, WholeImageDigest)}


def digest_kind(recorded: str) -> type[ImageDigest]:
    """The digest class that made ``recorded`` (``"ALGORITHM:hex"``), to check against it.

    :raises FormatError: an algorithm this version does not know.
    """
    algorithm = recorded.partition(":")[0]
    kind = _DIGESTS.get(algorithm)
    if kind is None:
        raise FormatError(f"overlay metadata names a digest algorithm {algorithm[:40]!r} this version does not know")
    return kind


def file_digest(path: Path, kind: type[ImageDigest] = ImageDigest) -> str:
    """The digest of a file's bytes; holes are hashed as zeros without being read."""
    digest = kind()
    pos = 0
    with open(path, "rb") as f:
        for start, length in data_extents(path).tolist():
            digest.update_zeros(start - pos)
            f.seek(start)
            remaining = length
            while remaining:
                chunk = f.read(min(remaining, 8 << 20))
                if not chunk:
                    raise ConfigError(f"{path} changed while it was read")
                digest.update(chunk)
                remaining -= len(chunk)
            pos = start + length
        digest.update_zeros(os.fstat(f.fileno()).st_size - pos)
    return digest.hexdigest()


def own_file_digest(path: Path, kind: type[ImageDigest] = ImageDigest) -> str:
    """:func:`file_digest` of a file only this process writes (an output not yet in place),
    hashed straight from the page cache through a read-only map instead of copied out a chunk
    at a time, which costs several times the hashing itself; whole chunks of holes are never
    touched. A file another process could cut short must go through :func:`file_digest`
    instead: reading a map past a truncation is a fatal signal, not an error.
    """
    digest = kind()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        with memoryview(mapped) as view:
            pos = 0
            for start, length in data_extents(path).tolist():
                stop = start + length
                start = max(start - start % kind.CHUNK, pos)  # chunks the data touches are hashed whole
                if start >= stop:
                    continue
                digest.update_zeros(start - pos)
                pos = min(stop + -stop % kind.CHUNK, size)
                for at in range(start, pos, kind.CHUNK):
                    digest.update(view[at : min(at + kind.CHUNK, pos)])
                    _drop(mapped, at, min(at + kind.CHUNK, pos))  # the pages stay cached, not mapped
            digest.update_zeros(size - pos)
    finally:
        mapped.close()
    return digest.hexdigest()


def _drop(mapped: mmap.mmap, start: int, stop: int) -> None:
    """Unmap ``[start, stop)`` of a read-only file map from this process (the file's pages stay
    in the page cache): hashing a large file does not grow the process by its size."""
    with contextlib.suppress(OSError, ValueError):
        mapped.madvise(mmap.MADV_DONTNEED, start, stop - start)
