"""The ``raw`` and ``qcow2`` disk sources.

``raw`` is the disk byte for byte; what it adds over the core's plain ``file`` source is that it
knows disks are sparse (holes found with SEEK_DATA/SEEK_HOLE are skipped by change detection and
stay holes in the output) and that it can write a thin qcow2 backed by the base instead of a raw
file. ``qcow2`` presents the guest-visible contents of a qcow2 and its backing chain, and, when
the modified disk is a qcow2 on top of a backing file, the clusters it allocates as change
hints: only those units can differ from the backing file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vmdelta_core.plugin import (
    ConfigError,
    FormatError,
    ImageKind,
    RebuiltImage,
    Source,
    SourceImage,
    data_extents,
    map_readonly,
    open_file_image,
)
from vmdelta_source_disk.chain import compose, open_chain
from vmdelta_source_disk.extents import punch_hole, to_spans, unit_spans
from vmdelta_source_disk.qcow2_writer import MAX_L1_BYTES, WriteResult, l1_bytes, write_qcow2

__all__ = ["Qcow2Source", "RawSource", "sparsify", "write_thin_qcow2"]

HINT_UNIT = 4096
_OUTPUT_FORMATS = ("raw", "qcow2")


def _output_format(rebuilt: RebuiltImage, default: str) -> str:
    fmt = rebuilt.options.get("output_format") or default
    if fmt not in _OUTPUT_FORMATS:
        raise ConfigError(f"unknown disk output format {fmt!r}; choose one of {', '.join(_OUTPUT_FORMATS)}")
    return str(fmt)


def _cluster_bits(options: Mapping[str, Any], default: int) -> int:
    value = options.get("qcow2_cluster_size", 1 << default)
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"qcow2_cluster_size {value!r} is not a number of bytes") from None
    if size <= 0 or size & (size - 1) or not 512 <= size <= 2 << 20:
        raise ConfigError(f"qcow2_cluster_size {size} is not a power of two between 512 and 2 MiB")
    return size.bit_length() - 1


def _no_envelope(rebuilt: RebuiltImage, source: str) -> None:
    if rebuilt.envelope:
        raise FormatError(
            f"the overlay holds a {len(rebuilt.envelope)}-byte envelope for a {source} disk, which has none"
        )


def _qcow2_layout(rebuilt: RebuiltImage) -> tuple[int, int, bool]:
    """Read the untrusted layout of a qcow2 image from the overlay: (version, cluster bits, backed).

    Each field is checked before it is used (a cluster size is an allocation size); a field the
    layout leaves out takes the value a new qcow2 would have.
    """
    layout = rebuilt.layout
    version = layout.get("version", 3)
    if type(version) is not int or version not in (2, 3):
        raise FormatError(f"qcow2 layout: version {version!r} is not 2 or 3")
    bits = layout.get("cluster_bits", 16)
    if type(bits) is not int or not 9 <= bits <= 21:
        raise FormatError(f"qcow2 layout: cluster_bits {bits!r} is not between 9 and 21")
    if l1_bytes(rebuilt.size, bits) > MAX_L1_BYTES:
        raise FormatError(
            f"qcow2 layout: cluster_bits {bits} would need an L1 table over {MAX_L1_BYTES >> 20} MiB "
            f"for a {rebuilt.size}-byte disk"
        )
    backing = layout.get("backing_file")
    if backing is not None and not isinstance(backing, str):
        raise FormatError(f"qcow2 layout: backing_file {backing!r} is not a file name")
    return version, bits, bool(backing)


def _clusters_of(spans: np.ndarray, cs: int) -> np.ndarray:
    """Indices of the ``cs``-byte clusters that ``[start, end)`` spans touch."""
    parts = [np.arange(s // cs, -(-e // cs), dtype=np.int64) for s, e in spans.tolist()]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def sparsify(path: Path, units: np.ndarray, unit: int) -> int:
    """Punch holes where whole ``units`` of ``path`` are zero; returns the bytes released.

    Only the given units are read, so the cost follows the overlay, not the disk.
    """
    units = np.unique(np.asarray(units, dtype=np.int64))
    if units.shape[0] == 0:
        return 0
    data, closers = map_readonly(path)
    released = 0
    try:
        size = data.shape[0]
        units = units[(units + 1) * unit <= size]
        whole = data[: (size // unit) * unit].reshape(-1, unit)
        zero = np.zeros(units.shape[0], dtype=bool)
        for k in range(0, units.shape[0], 1024):
            zero[k : k + 1024] = ~whole[units[k : k + 1024]].view(np.uint64).any(axis=1)
        del whole
        runs = units[zero]
        if runs.shape[0]:
            brk = np.flatnonzero(np.diff(runs) != 1) + 1
            fd = os.open(path, os.O_RDWR)
            try:
                for run in np.split(runs, brk):
                    start, length = int(run[0]) * unit, int(run.shape[0]) * unit
                    if not punch_hole(fd, start, length):
                        break
                    released += length
            finally:
                os.close(fd)
    finally:
        del data
        for closer in closers:
            closer.close()  # type: ignore[attr-defined]
    return released


def write_thin_qcow2(rebuilt: RebuiltImage, output: Path, *, cluster_bits: int, version: int = 3) -> WriteResult:
    """A qcow2 at ``output`` backed by the base disk, holding only the clusters the overlay changed.

    Units past the end of the base (a grown disk) that hold data are included too: a backing
    file reads as zeros past its end.
    """
    base_path = Path(rebuilt.base_path).resolve()
    base_format = str(rebuilt.base.layout.get("format", "raw"))
    units = np.asarray(rebuilt.changed, dtype=np.int64)
    cs = 1 << cluster_bits
    clusters = np.unique(units * rebuilt.unit_size // cs)
    if rebuilt.size > rebuilt.base.size:
        grown = to_spans(data_extents(rebuilt.path, rebuilt.base.size, rebuilt.size))
        clusters = np.union1d(clusters, _clusters_of(grown, cs))
    return write_qcow2(
        output,
        rebuilt.path,
        clusters,
        size=rebuilt.size,
        cluster_bits=cluster_bits,
        version=version,
        backing=(str(base_path), base_format),
    )


class RawSource(Source):
    """A raw disk image; sparse files stay sparse."""

    name = "raw"
    kinds = frozenset({"disk"})
    output_formats = ("qcow2",)

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        if kind != "disk":
            raise ConfigError(f"the raw source reads disks, not {kind} images")
        return open_file_image(path, kind, layout={"format": "raw"})

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        _no_envelope(rebuilt, self.name)
        if _output_format(rebuilt, "raw") == "qcow2":
            write_thin_qcow2(rebuilt, output, cluster_bits=_cluster_bits(rebuilt.options, 16))
            return
        sparsify(rebuilt.path, rebuilt.changed, rebuilt.unit_size)
        rebuilt.move_to(output)


class Qcow2Source(Source):
    """A qcow2 image (version 2 or 3) read through its backing chain."""

    name = "qcow2"
    kinds = frozenset({"disk"})
    option_names = frozenset({"tmpdir", "use_hints"})
    output_formats = ("raw",)

    def open(self, path: Path, *, kind: ImageKind, options: Mapping[str, Any]) -> SourceImage:
        if kind != "disk":
            raise ConfigError(f"the qcow2 source reads disks, not {kind} images")
        chain = open_chain(Path(path))
        try:
            top = chain.layers[0]
            try:
                image = compose(chain, tmpdir=options.get("tmpdir"))
            except OSError as exc:  # a virtual size the temporary folder or the address space cannot hold
                raise ConfigError(f"cannot present {path} as an image: {exc.strerror or exc}") from None
            backing = None
            if len(chain.layers) > 1:
                backing = chain.layers[1].info.path
            elif chain.raw is not None:
                backing = chain.raw
            hints = None
            if backing is not None and options.get("use_hints", True):
                cm = top.clusters
                hints = unit_spans(cm.guest, top.info.cluster_size, HINT_UNIT, top.info.size)
            layout = {
                "format": "qcow2",
                "version": top.info.version,
                "cluster_bits": top.info.cluster_bits,
                "compression": top.info.compression,
                "backing_file": top.info.backing_file,
                # the file the hints are relative to; they hold only against this very file
                "hints_base": str(backing.resolve()) if backing is not None else None,
                "chain_depth": len(chain.layers) + (chain.raw is not None),
                "snapshots": top.info.nb_snapshots,
            }
        finally:
            chain.close()
        return SourceImage(
            kind=kind,
            data=image.data,
            holes=image.holes,
            hints=hints,
            hints_base=backing.resolve() if backing is not None else None,
            layout=layout,
            exact_artifact=False,
            closers=image.closers,
        )

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        _no_envelope(rebuilt, self.name)
        if _output_format(rebuilt, "qcow2") == "raw":
            sparsify(rebuilt.path, rebuilt.changed, rebuilt.unit_size)
            rebuilt.move_to(output)
            return
        version, layout_bits, backed = _qcow2_layout(rebuilt)
        bits = _cluster_bits(rebuilt.options, layout_bits)
        if backed:
            # the modified disk was an overlay: so is the rebuilt one, over the given base
            write_thin_qcow2(rebuilt, output, cluster_bits=bits, version=version)
            return
        clusters = _clusters_of(to_spans(data_extents(rebuilt.path)), 1 << bits)
        write_qcow2(output, rebuilt.path, clusters, size=rebuilt.size, cluster_bits=bits, version=version)
