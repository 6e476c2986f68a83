"""Frame codecs: ``zstd`` (the default), ``lzma`` and ``none``."""

from __future__ import annotations

import lzma
from collections.abc import Callable

import zstandard

from vmdelta_core.components import Codec
from vmdelta_core.errors import FormatError
from vmdelta_core.hookspecs import hookimpl


class ZstdCodec(Codec):
    name = "zstd"
    default_level = 9
    #: negative levels trade ratio for speed; libzstd's lowest is -(1 << 17) (ZSTD_minCLevel(),
    #: which python-zstandard does not expose, and below which it quietly clamps)
    level_range = (-(1 << 17), zstandard.MAX_COMPRESSION_LEVEL)

    def compress(self, data: bytes, level: int | None) -> bytes:
        level = self.default_level if level is None else level
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)

    def decompress(self, data: bytes, size: int) -> bytes:
        try:
            # zstandard allocates whatever size a frame header claims: hold the claim to the index
            if zstandard.frame_content_size(data) > size:
                raise FormatError(f"zstd frame claims more than the {size} bytes the index says")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd frame does not decompress: {exc}") from None
        if len(out) != size:
            raise FormatError(f"zstd frame holds {len(out)} bytes, the index says {size}")
        return out


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
    register(LzmaCodec())
    register(NoneCodec())
