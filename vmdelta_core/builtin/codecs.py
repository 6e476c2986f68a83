"""Frame codecs: ``zstd`` (the default), ``zstd-base`` (the size mode), ``lzma`` and ``none``."""

from __future__ import annotations

import lzma
import struct
from collections.abc import Callable, Sequence

import zstandard

from vmdelta_core.components import Codec
from vmdelta_core.errors import FormatError
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.overlay.items import join_payloads, split_payloads


class ZstdCodec(Codec):
    name = "zstd"
    #: what dedup and the encoders leave is already the hard part; levels above 3 shrink it by
    #: about 3% (level 9) for a third more of create's time
    default_level = 3
    #: ``--level max``: frames compressed against the base (:class:`ZstdBaseCodec`) at level 19
    size_mode = ("zstd-base", 19)
    #: negative levels trade ratio for speed; libzstd's lowest is -(1 << 17) (ZSTD_minCLevel(),
    #: which python-zstandard does not expose, and below which it quietly clamps)
    level_range = (-(1 << 17), zstandard.MAX_COMPRESSION_LEVEL)

    def compress(self, data: bytes, level: int | None) -> bytes:
        level = self.default_level if level is None else level
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)

    def decompress(self, data: bytes, size: int) -> bytes:
        return _exactly(data, size, "zstd frame")


#: a ``zstd-base`` frame names at most this many base runs, holding at most this many bytes in
#: all (untrusted input: the reader gathers them before it decompresses)
MAX_PREFIX_RUNS = 1 << 16
MAX_PREFIX = 64 << 20
#: the largest zstd window a ``zstd-base`` frame may ask for: its prefix and its own bytes
MAX_WINDOW_LOG = 27
_HEAD = struct.Struct(">II")
#: bytes a thread compresses at a time when a frame is shared between threads: each job still
#: sees the prefix and what came before it in the window, so the frame is as small (measured)
_JOB = 4 << 20
_RUN = struct.Struct(">QI")

#: (offset, length) runs of a base image
Runs = Sequence[tuple[int, int]]
#: what a frame's prefix is made of, chosen for one frame: its runs and their bytes, joined
PrefixChooser = Callable[[int, bytes], tuple[Runs, bytes]]
#: ``read(offset, length)``: bytes of the base of the frame's image (refusing what lies outside it)
BaseReader = Callable[[int, int], bytes]


class ZstdBaseCodec(Codec):
    """zstd with bytes of the image's *base* as a raw-content prefix, chosen frame by frame.

    What ``zstd --patch-from`` does for a whole file, per frame: the writer picks the base runs
    the frame's units resemble (their own address, and wherever their content is found in the
    base, unaligned), names them at the head of the stored frame, and zstd refers back into them.
    A reader therefore needs the base to decompress (:meth:`decompress_frame`); the stored form is
    in ``schemas/overlay-v1.md``. Unbound (as registered), it writes frames with no prefix.
    """

    name = "zstd-base"
    default_level = 19
    level_range = (1, zstandard.MAX_COMPRESSION_LEVEL)
    #: frame readers hand :meth:`decompress_frame` the base of the frame's image
    reads_base = True

    def __init__(self, choose: PrefixChooser | None = None, threads: int = 1) -> None:
        self._choose = choose
        self._threads = threads

    def bind(self, choose: PrefixChooser, threads: int = 1) -> ZstdBaseCodec:
        """This codec, picking each frame's prefix with ``choose(image number, frame bytes)``,
        compressing a frame with up to ``threads`` threads (a single large frame, as a disk's
        changes often are, then uses every core; the frame is the same format)."""
        return ZstdBaseCodec(choose, threads)

    def compress(self, data: bytes, level: int | None) -> bytes:
        return self._compress(data, level, (), b"")

    def compress_frame(self, image: int, data: bytes, level: int | None) -> bytes:
        """A frame of image ``image``, with the prefix the bound chooser picks for it."""
        if self._choose is None:
            return self.compress(data, level)
        runs, prefix = self._choose(image, data)
        return self._compress(data, level, runs, prefix)

    def _compress(self, data: bytes, level: int | None, runs: Runs, prefix: bytes) -> bytes:
        if len(runs) > MAX_PREFIX_RUNS or len(prefix) > MAX_PREFIX or sum(n for _, n in runs) != len(prefix):
            raise ValueError(f"a frame prefix of {len(runs)} runs and {len(prefix)} bytes is out of bounds")
        # a window of twice what the prefix and the frame hold finds more than one just covering them
        window = min(max((len(prefix) + len(data)).bit_length() + 1, 10), MAX_WINDOW_LOG)
        params = zstandard.ZstdCompressionParameters.from_level(
            self.default_level if level is None else level,
            source_size=len(data),
            window_log=window,
            write_content_size=True,
            write_checksum=False,
            write_dict_id=False,
            **({"threads": self._threads, "job_size": _JOB} if self._threads > 1 and len(data) > _JOB else {}),
        )
        compressor = zstandard.ZstdCompressor(compression_params=params, dict_data=_raw_dictionary(prefix))
        head = _pack_runs(runs)
        return head + compressor.compress(split_payloads(data))

    def decompress(self, data: bytes, size: int) -> bytes:
        raise FormatError("a zstd-base frame decompresses only against its base image")

    def decompress_frame(self, data: bytes, size: int, read: BaseReader) -> bytes:
        """Decompress a frame of ``size`` bytes, its prefix read from the base by ``read``."""
        runs, payload = parse_prefix_runs(data)
        prefix = b"".join(read(offset, length) for offset, length in runs)
        try:
            if zstandard.frame_content_size(payload) != size:
                raise FormatError(f"zstd-base frame does not declare the {size} bytes the index says")
            decompressor = zstandard.ZstdDecompressor(
                dict_data=_raw_dictionary(prefix), max_window_size=1 << MAX_WINDOW_LOG
            )
            out = decompressor.decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd-base frame does not decompress: {exc}") from None
        if len(out) != size:
            raise FormatError(f"zstd-base frame holds {len(out)} bytes, the index says {size}")
        try:
            return join_payloads(out)
        except FormatError as exc:
            raise FormatError(f"zstd-base frame (decompressed): {exc}") from None


def _pack_runs(runs: Runs) -> bytes:
    """The head of a stored frame: its base runs, gaps between them, zstd-compressed."""
    table, end = [], 0
    for offset, length in runs:
        if offset < end or length <= 0:
            raise ValueError("a frame's base runs must be sorted, apart and not empty")
        table.append(_RUN.pack(offset - end, length))
        end = offset + length
    stored = zstandard.ZstdCompressor(level=19).compress(b"".join(table)) if table else b""
    return _HEAD.pack(len(runs), len(stored)) + stored


def parse_prefix_runs(data: bytes) -> tuple[list[tuple[int, int]], memoryview]:
    """The base runs a ``zstd-base`` frame names, checked against the bounds, and its zstd frame."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise FormatError("zstd-base frame is shorter than its head")
    count, stored = _HEAD.unpack_from(view)
    if count > MAX_PREFIX_RUNS or stored > len(view) - _HEAD.size or (count == 0) != (stored == 0):
        raise FormatError(f"zstd-base frame names {count} base runs in {stored} bytes, which it cannot hold")
    if count:
        table = _table_of(view[_HEAD.size : _HEAD.size + stored], count * _RUN.size)
        runs, end = [], 0
        for gap, length in _RUN.iter_unpack(table):
            offset, end = end + gap, end + gap + length
            if length == 0 or end >= 1 << 52:
                raise FormatError(f"zstd-base frame names a base run of {length} bytes at {offset}")
            runs.append((offset, length))
    else:
        runs = []
    if sum(length for _, length in runs) > MAX_PREFIX:
        raise FormatError(f"zstd-base frame names more than {MAX_PREFIX} base bytes as its prefix")
    return runs, view[_HEAD.size + stored :]


def _table_of(stored: memoryview, size: int) -> bytes:
    """A frame's run table, exactly ``size`` bytes or a FormatError."""
    return _exactly(stored, size, "zstd-base frame's run table")


def _exactly(data: bytes | memoryview, size: int, what: str) -> bytes:
    """The zstd frame ``data`` decompressed to exactly ``size`` bytes, or a FormatError naming
    ``what``. zstandard allocates whatever size a frame header claims: the frame must declare
    ``size`` (as every frame vmdelta writes does) before anything is decompressed."""
    try:
        if zstandard.frame_content_size(data) != size:
            raise FormatError(f"{what} does not declare its {size} bytes")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what} does not decompress: {exc}") from None
    if len(out) != size:
        raise FormatError(f"{what} holds {len(out)} bytes, the index says {size}")
    return out


def _raw_dictionary(prefix: bytes) -> zstandard.ZstdCompressionDict | None:
    return zstandard.ZstdCompressionDict(prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if prefix else None


class LzmaCodec(Codec):
    name = "lzma"
    default_level = 6
    level_range = (0, 9)  # xz presets

    def compress(self, data: bytes, level: int | None) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=self.default_level if level is None else level)

    def decompress(self, data: bytes, size: int) -> bytes:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = decompressor.decompress(data, max_length=size)
        except lzma.LZMAError as exc:
            raise FormatError(f"lzma frame does not decompress: {exc}") from None
        if len(out) != size or not decompressor.eof:
            raise FormatError(f"lzma frame does not hold exactly the {size} bytes the index says")
        return out


class NoneCodec(Codec):
    name = "none"
    level_range = None

    def compress(self, data: bytes, level: int | None) -> bytes:
        return bytes(data)

    def decompress(self, data: bytes, size: int) -> bytes:
        if len(data) != size:
            raise FormatError(f"stored frame holds {len(data)} bytes, the index says {size}")
        return bytes(data)


@hookimpl
def vmdelta_register_codecs(register: Callable[[Codec], None]) -> None:
    register(ZstdCodec())
    register(ZstdBaseCodec())
    register(LzmaCodec())
    register(NoneCodec())
