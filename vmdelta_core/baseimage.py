"""Base images kept as their source lays them out, so that a base is opened by mapping a file.

A source that builds its image (a QEMU stream parsed and its RAM laid out page by page, a qcow2
chain composed) does that work at every ``create`` and ``apply``: 0.2 s for a 128 MiB guest's
stream, more as RAM grows. ``vmdelta index --image`` keeps the image it built in the cache
folder, next to the index and keyed the same way (the base's path, identity, size and times, its
source and options), with what else the source returned (envelope, layout, holes); later opens
of that base map the kept file instead. A base that changes gets a new key, so a kept image is
never used for another base. A kept image is trusted as the index is: every output apply writes
is still verified against the digest recorded at create, so a damaged cache fails an apply, it
never makes a wrong VM.

Bases whose image is the file itself (raw disks) have nothing to keep.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from vmdelta_core.components import Source, SourceImage
from vmdelta_core.fileio import map_readonly
from vmdelta_core.index import cache_folder, index_key
from vmdelta_core.outputs import OutputSet

__all__ = ["keep_image", "kept_image", "open_base_image"]

_MAGIC = b"VMDIMG01"
_VERSION = 1
#: the head of a kept image's description: magic, then the length of its JSON
_HEAD = struct.Struct("<8sI")
_MAX_JSON = 64 << 20
#: bytes of the image looked at at a time when it is written (runs of zeros are left as holes)
_STEP = 1 << 20


def _paths(path: Path, source: str, options: dict[str, Any], cache_dir: Path | None) -> tuple[Path, Path, dict]:
    key = {**index_key(path, source, 0, options), "kept_image": _VERSION}
    name = xxhash.xxh3_128_hexdigest(json.dumps(key, sort_keys=True).encode())
    folder = cache_folder(cache_dir)
    return folder / f"{name}.vmdimg", folder / f"{name}.vmdimg.meta", key


def open_base_image(
    source: Source, name: str, path: Path, *, kind: str, options: dict[str, Any], cache_dir: Path | None
) -> SourceImage:
    """The base at ``path`` as source ``name`` opens it: from its kept image when there is one
    for the base as it is now, else opened by the source."""
    kept = kept_image(path, name, kind=kind, options=options, cache_dir=cache_dir)
    if kept is not None:
        return kept
    return source.open(path, kind=kind, options=options)  # type: ignore[arg-type]


def kept_image(
    path: Path, source: str, *, kind: str, options: dict[str, Any], cache_dir: Path | None
) -> SourceImage | None:
    """The kept image of the base at ``path``, or ``None`` when none was kept for it as it is
    now (or what was kept does not read back whole)."""
    try:
        image_path, meta_path, key = _paths(path, source, options, cache_dir)
        if not meta_path.is_file():
            return None
        with open(meta_path, "rb") as f:
            magic, length = _HEAD.unpack(f.read(_HEAD.size))
            if magic != _MAGIC or length > _MAX_JSON:
                return None
            meta = json.loads(f.read(length))
            envelope = f.read(meta["envelope"])
            holes = np.frombuffer(f.read(16 * meta["holes"]), dtype="<i8").reshape(-1, 2).astype(np.int64)
            hints = None
            if meta["hints"] is not None:
                hints = np.frombuffer(f.read(8 * meta["hints"]), dtype="<i8").astype(np.int64)
        st = os.stat(image_path)
        if (
            meta["key"] != key
            or meta["kind"] != kind
            or len(envelope) != meta["envelope"]
            or [st.st_ino, st.st_size, st.st_mtime_ns] != meta["file"]
            or st.st_size != meta["size"]
        ):
            return None
        data, closers = map_readonly(image_path)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return SourceImage(
        kind=kind,  # type: ignore[arg-type]
        data=data,
        holes=holes,
        hints=hints,
        hints_base=Path(meta["hints_base"]) if meta["hints_base"] else None,
        envelope=envelope,
        layout=meta["layout"],
        exact_artifact=bool(meta["exact_artifact"]),
        mapping=closers[0] if closers else None,
        closers=closers,
    )


def keep_image(
    path: Path, image: SourceImage, *, source: str, options: dict[str, Any], cache_dir: Path | None
) -> Path | None:
    """Keep ``image`` (the base at ``path`` as source ``source`` opened it) in the cache folder;
    its path, or ``None`` when the image is the base file itself and there is nothing to keep.
    Both files appear together, flushed to disk, or neither does."""
    if image.file is not None:
        return None
    image_path, meta_path, key = _paths(path, source, options, cache_dir)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    with OutputSet([path]) as outputs:
        pending = outputs.add(image_path)
        with open(pending.path, "wb") as f:
            _write_sparse(f.fileno(), image)
            st = os.fstat(f.fileno())
        holes = np.asarray(image.holes, dtype="<i8").reshape(-1, 2)
        hints = None if image.hints is None else np.asarray(image.hints, dtype="<i8")
        meta = {
            "key": key,
            "kind": image.kind,
            "size": image.size,
            "file": [st.st_ino, st.st_size, st.st_mtime_ns],
            "layout": dict(image.layout),
            "exact_artifact": image.exact_artifact,
            "envelope": len(image.envelope),
            "holes": int(holes.shape[0]),
            "hints": None if hints is None else int(hints.shape[0]),
            "hints_base": str(image.hints_base) if image.hints_base else None,
        }
        document = json.dumps(meta, sort_keys=True).encode()
        described = outputs.add(meta_path)
        with open(described.path, "wb") as f:
            f.write(_HEAD.pack(_MAGIC, len(document)) + document + image.envelope + holes.tobytes())
            if hints is not None:
                f.write(hints.tobytes())
        outputs.commit()
    return image_path


def _write_sparse(fd: int, image: SourceImage) -> None:
    """The image's bytes into ``fd``, runs of zeros left as holes."""
    data, size = image.data, image.size
    for start in range(0, size, _STEP):
        piece = data[start : start + _STEP]
        if piece.view(np.uint64).any() if piece.shape[0] % 8 == 0 else piece.any():
            os.pwrite(fd, memoryview(piece), start)
        image.release(start, start + _STEP)
    os.ftruncate(fd, size)
