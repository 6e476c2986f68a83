"""A qcow2 backing chain resolved to what the guest sees, without copying what it does not own.

The guest-visible image is presented as one read-only memory range of the virtual size:

* the bytes a qcow2 layer defines (data, compressed or zero clusters) are written once, by the
  topmost layer that defines them, into a sparse unlinked temporary file (zero clusters stay
  holes there, compressed clusters are inflated);
* a raw file at the bottom of the chain is mapped directly, and the temporary file is mapped
  over it (``MAP_FIXED``) only where a qcow2 layer defines bytes.

So opening a 100 GiB base with a thin qcow2 on top costs the size of the overlay, not of the
base. When the layers define too many separate ranges for the kernel's mapping limit, the raw
bottom's data is copied into the temporary file instead (slower, same result).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import tempfile
from pathlib import Path

import attrs
import numpy as np

from vmdelta_core.plugin import ConfigError, FormatError, data_extents, open_regular
from vmdelta_source_disk import c_qcow2 as c
from vmdelta_source_disk.extents import copy_range, intersect, normalize, subtract, to_extents, to_spans, union
from vmdelta_source_disk.qcow2 import ClusterMap, Qcow2Info, decompress_cluster, read_cluster_map, read_info

__all__ = ["Chain", "ComposedImage", "compose", "open_chain"]

MAX_DEPTH = 64
#: separate file mappings we allow ourselves (Linux's default vm.max_map_count is 65530)
MAX_MAPPINGS = 16384
_PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10


@attrs.define
class Layer:
    info: Qcow2Info
    fd: int
    clusters: ClusterMap


@attrs.define
class Chain:
    """The qcow2 layers from the top down and the raw file at the bottom, if any."""

    layers: list[Layer]
    raw: Path | None
    raw_fd: int | None

    def close(self) -> None:
        for layer in self.layers:
            os.close(layer.fd)
        if self.raw_fd is not None:
            os.close(self.raw_fd)
        self.layers, self.raw_fd = [], None


@attrs.define(eq=False)
class ComposedImage:
    data: np.ndarray
    holes: np.ndarray  # (start, length) extents known zero
    closers: list[object]


def _open(path: Path, role: str = "disk image") -> int:
    """Open a layer of the chain; only a regular file will do (a backing file name is untrusted,
    and a FIFO it names would block ``open`` for ever)."""
    return open_regular(path, role)


def _resolve_backing(top: Path, name: str) -> Path:
    if "\0" in name:
        raise FormatError(f"{top}: the backing file name {name!r} holds a NUL byte")
    if ":" in name.split("/", 1)[0] or name.startswith("json:"):
        raise ConfigError(f"{top}: backing file {name!r} is not a local file; only local files are supported")
    backing = Path(name) if os.path.isabs(name) else top.parent / name
    try:
        os.stat(backing)
    except FileNotFoundError:
        raise ConfigError(f"{top}: its backing file {backing} does not exist") from None
    except OSError as exc:  # a name too long, a loop of symbolic links, a path through a file
        raise ConfigError(f"{top}: cannot use its backing file {name!r}: {exc.strerror}") from None
    return backing


def open_chain(path: Path) -> Chain:
    """Open ``path`` and its backing files down to a file without one (or a raw file)."""
    chain = Chain(layers=[], raw=None, raw_fd=None)
    seen: set[str] = set()
    current = Path(path)
    try:
        while True:
            real = os.path.realpath(current)
            if real in seen or len(chain.layers) >= MAX_DEPTH:
                raise FormatError(f"{path}: the backing chain loops or is deeper than {MAX_DEPTH}")
            seen.add(real)
            role = f"{chain.layers[-1].info.path}: its backing file" if chain.layers else "disk image"
            fd = _open(current, role)
            try:
                info = read_info(current, fd)
                chain.layers.append(Layer(info=info, fd=fd, clusters=read_cluster_map(info, fd)))
            except BaseException:
                os.close(fd)
                raise
            if info.backing_file is None:
                return chain
            backing = _resolve_backing(current, info.backing_file)
            fmt = info.backing_format
            if fmt is None or fmt == "raw":
                fd = _open(backing, role=f"{current}: its backing file")
                if fmt is None:  # no format extension: probe like QEMU does
                    fmt = "qcow2" if os.pread(fd, 4, 0) == c.MAGIC else "raw"
                if fmt == "raw":
                    chain.raw, chain.raw_fd = backing, fd
                    return chain
                os.close(fd)
            if fmt != "qcow2":
                raise ConfigError(
                    f"{current}: backing file {backing} is in format {fmt!r}; only raw and qcow2 are read"
                )
            current = backing
    except BaseException:
        chain.close()
        raise


def _spans(layer: Layer, kinds: tuple[int, ...], limit: int) -> np.ndarray:
    cm = layer.clusters
    pick = np.isin(cm.kind, kinds)
    starts = cm.guest[pick]
    return normalize(np.stack([starts, np.minimum(starts + layer.info.cluster_size, limit)], axis=1))


def compose(chain: Chain, tmpdir: str | None = None) -> ComposedImage:
    """The guest-visible image of ``chain`` as a read-only array, and its known-zero ranges."""
    size = chain.layers[0].info.size
    limit, claimed = size, np.zeros((0, 2), dtype=np.int64)
    plans: list[tuple[Layer, np.ndarray]] = []
    for layer in chain.layers:
        limit = min(limit, layer.info.size)  # a shorter backing file reads as zeros past its end
        data = _spans(layer, (ClusterMap.DATA, ClusterMap.COMPRESSED), limit)
        plans.append((layer, subtract(data, claimed)))
        claimed = union(claimed, data, _spans(layer, (ClusterMap.ZERO,), limit))
    visible = union(*(p[1] for p in plans))
    raw_visible = np.zeros((0, 2), dtype=np.int64)
    raw_limit = 0
    if chain.raw is not None:
        raw_size = os.fstat(chain.raw_fd).st_size  # type: ignore[arg-type]
        raw_limit = min(limit, raw_size)
        raw_visible = subtract(intersect(to_spans(data_extents(chain.raw, 0, raw_limit)), [[0, raw_limit]]), claimed)
    holes = to_extents(subtract([[0, size]], union(visible, raw_visible)))

    with tempfile.TemporaryFile(dir=tmpdir, prefix="vmdelta-qcow2-") as tmp:
        tfd = tmp.fileno()
        os.ftruncate(tfd, size)
        for layer, wanted in plans:
            _write_layer(layer, wanted, tfd)
        if chain.raw is None or raw_visible.shape[0] == 0:
            return _whole(tfd, size, holes)
        # ranges of the temporary file to map over the raw file, widened to whole pages
        over = claimed if raw_limit % _PAGE == 0 else union(claimed, [[raw_limit, -(-raw_limit // _PAGE) * _PAGE]])
        over = intersect(over, [[0, size]])
        pages = normalize(np.stack([over[:, 0] // _PAGE * _PAGE, -(-over[:, 1] // _PAGE) * _PAGE], axis=1))
        slack = intersect(subtract(pages, over), raw_visible)
        if pages.shape[0] > MAX_MAPPINGS:
            slack = raw_visible  # too many pieces: copy the raw data in and map one file
        for start, end in slack.tolist():
            copy_range(chain.raw_fd, tfd, start, start, end - start)  # type: ignore[arg-type]
        if pages.shape[0] > MAX_MAPPINGS:
            return _whole(tfd, size, holes)
        return _layered(chain.raw_fd, raw_limit, tfd, pages, size, holes)  # type: ignore[arg-type]


def _write_layer(layer: Layer, wanted: np.ndarray, tfd: int) -> None:
    """Copy the clusters of ``layer`` that are visible (``wanted`` spans) into the temporary file."""
    if wanted.shape[0] == 0:
        return
    cm, cs = layer.clusters, layer.info.cluster_size
    starts = cm.guest
    ends = np.minimum(starts + cs, layer.info.size)
    i = np.searchsorted(wanted[:, 0], starts, side="right") - 1
    full = (i >= 0) & (ends <= wanted[np.maximum(i, 0), 1])
    k = np.searchsorted(wanted[:, 0], ends, side="left") - 1
    touched = (k >= 0) & (wanted[np.maximum(k, 0), 1] > starts)
    data = cm.kind == ClusterMap.DATA
    # whole data clusters, coalesced into runs contiguous in both guest and host
    pick = np.flatnonzero(full & data)
    if pick.size:
        g, h, e = starts[pick], cm.host[pick], ends[pick]
        brk = np.ones(pick.size, dtype=bool)
        brk[1:] = (g[1:] != e[:-1]) | (h[1:] != h[:-1] + (e[:-1] - g[:-1]))
        first = np.flatnonzero(brk)
        last = np.append(first[1:] - 1, pick.size - 1)
        for a, b in zip(first.tolist(), last.tolist(), strict=True):
            copy_range(layer.fd, tfd, int(h[a]), int(g[a]), int(e[b] - g[a]))
    # compressed clusters, and clusters an upper layer covers in part (different cluster sizes)
    for n in np.flatnonzero(touched & ~(full & data)).tolist():
        g, e = int(starts[n]), int(ends[n])
        pieces = [[g, e]] if full[n] else intersect([[g, e]], wanted).tolist()
        if cm.kind[n] == ClusterMap.COMPRESSED:
            block = decompress_cluster(layer.info, layer.fd, int(cm.host[n]), int(cm.length[n]))
            for a, b in pieces:
                os.pwrite(tfd, block[a - g : b - g], a)
        elif cm.kind[n] == ClusterMap.DATA:
            for a, b in pieces:
                copy_range(layer.fd, tfd, int(cm.host[n]) + a - g, a, b - a)


def _whole(tfd: int, size: int, holes: np.ndarray) -> ComposedImage:
    if size == 0:
        return ComposedImage(np.zeros(0, dtype=np.uint8), holes, [])
    mapped = mmap.mmap(tfd, size, prot=mmap.PROT_READ)
    return ComposedImage(np.frombuffer(mapped, dtype=np.uint8), holes, [mapped])


def _libc_mmap() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    libc = ctypes.CDLL(None, use_errno=True)
    func = libc.mmap
    func.restype = ctypes.c_void_p
    func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    return func


def _layered(raw_fd: int, raw_limit: int, tfd: int, pages: np.ndarray, size: int, holes: np.ndarray) -> ComposedImage:
    """Anonymous zeros, the raw file over them, the temporary file over that.

    The Python ``mmap`` owns the whole range: closing it (or dropping the last array viewing
    it) unmaps every piece mapped over it, and it refuses to close while arrays still view it.
    """
    reserve = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    data = np.frombuffer(reserve, dtype=np.uint8)
    base = data.ctypes.data
    map_at = _libc_mmap()
    end_of_range = -(-size // _PAGE) * _PAGE

    def place(fd: int, start: int, length: int) -> None:
        length = min(length, end_of_range - start)
        if length <= 0:
            return
        got = map_at(base + start, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, start)
        if got != base + start:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot map the image: {os.strerror(err)}")

    try:
        place(raw_fd, 0, -(-raw_limit // _PAGE) * _PAGE)
        for start, end in pages.tolist():
            place(tfd, start, end - start)
    except BaseException:
        del data
        with contextlib.suppress(BufferError):
            reserve.close()
        raise
    return ComposedImage(data, holes, [reserve])
