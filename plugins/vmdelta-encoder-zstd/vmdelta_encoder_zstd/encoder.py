"""The ``zstd`` encoder: each unit compressed by zstd with its base unit as the dictionary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import zstandard

from vmdelta_core.plugin import ConfigError, Encoder, FormatError

__all__ = ["DEFAULT_LEVEL", "ZstdEncoder", "window_log"]

#: see the README's measurements: level 3 is within 1% of level 9 after frame compression
DEFAULT_LEVEL = 3
# negative levels are zstd's "fast" modes
_MIN_LEVEL, _MAX_LEVEL = -7, zstandard.MAX_COMPRESSION_LEVEL


# frame header descriptor bits this encoder never sets: a content size (bits 7-6 and the
# single-segment bit 5, which implies one) and a dictionary id (bits 1-0). python-zstandard sizes
# its output buffer from a declared content size, whatever max_output_size says, so a damaged
# header could otherwise make it allocate gigabytes.
_FORBIDDEN_DESCRIPTOR_BITS = 0xE3


def window_log(length: int) -> int:
    """The zstd window (log2) for a unit: it covers the base and the unit, and nothing more.

    The decoder refuses frames asking for a larger window, so a damaged frame header cannot make
    it allocate more than about twice the unit (zstd's own limit is 2 GiB).
    """
    return min(max((2 * max(length, 1) - 1).bit_length(), 10), 30)


class ZstdEncoder(Encoder):
    """zstd with the base unit loaded as raw-content dictionary (a prefix the unit refers back to).

    Frames are written without magic number, content size, checksum or dictionary id: the item
    records the unit length, the overlay checksums frames and verifies the rebuilt images, so
    those would be 9-13 bytes of each payload spent twice. A unit is declined when its payload
    would not be smaller, or when its base is all zeros. This encoder has no classic ref id; the
    core hands it a free one per overlay.
    """

    name = "zstd"
    wire_ref = None

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        if not isinstance(level, int) or isinstance(level, bool) or not _MIN_LEVEL <= level <= _MAX_LEVEL:
            raise ConfigError(f"zstd: level must be an integer from {_MIN_LEVEL} to {_MAX_LEVEL}, not {level!r}")
        self.level = level

    def configure(self, options: Mapping[str, Any]) -> ZstdEncoder:
        """A copy with the pipeline's options applied (``level``)."""
        unknown = set(options) - {"level"}
        if unknown:
            raise ConfigError(f"zstd: unknown option(s) {', '.join(sorted(unknown))}; it takes: level")
        return ZstdEncoder(level=options.get("level", self.level))

    def _parameters(self, length: int) -> zstandard.ZstdCompressionParameters:
        return zstandard.ZstdCompressionParameters.from_level(
            self.level,
            source_size=length,
            dict_size=length,
            window_log=window_log(length),
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_content_size=False,
            write_checksum=False,
            write_dict_id=False,
        )

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        out: list[bytes | None] = []
        parameters: dict[int, zstandard.ZstdCompressionParameters] = {}
        for base, target in zip(bases, targets, strict=True):
            length = len(target)
            if length not in parameters:
                parameters[length] = self._parameters(length)
            source = bytes(base)
            if source.count(0) == len(source):
                # no dictionary to speak of: the unit compressed on its own loses to the frame
                # codec compressing raw units together
                out.append(None)
                continue
            dictionary = zstandard.ZstdCompressionDict(source, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            compressor = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=parameters[length])
            payload = compressor.compress(target)
            out.append(payload if len(payload) < length else None)
        return out

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        out: list[bytes] = []
        for base, payload, length in zip(bases, payloads, lengths, strict=True):
            if not payload or payload[0] & _FORBIDDEN_DESCRIPTOR_BITS:
                raise FormatError("zstd payload: its frame header declares a size or dictionary id, or is missing")
            dictionary = zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            decompressor = zstandard.ZstdDecompressor(
                dict_data=dictionary,
                max_window_size=1 << window_log(length),
                format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            )
            try:
                unit = decompressor.decompress(payload, max_output_size=length, allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise FormatError(f"zstd payload does not decompress: {exc}") from None
            if len(unit) != length:
                raise FormatError(f"zstd payload holds {len(unit)} bytes, not the {length}-byte unit")
            out.append(unit)
        return out
