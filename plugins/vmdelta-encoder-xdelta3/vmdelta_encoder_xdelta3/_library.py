"""ctypes binding of xdelta3's in-memory API, taken from the ``_xdelta3`` extension module.

The ``xdelta3`` distribution (0.0.5) compiles the whole xdelta3 3.1.1 library into its extension
module ``_xdelta3``; the module's own Python entry point is unusable on Python >= 3.10 (it parses
``y#`` without ``PY_SSIZE_T_CLEAN``), but the library's exported C functions are intact. We load
the shared object with :class:`ctypes.CDLL` without importing it as a module: a CDLL call drops
the GIL for its duration, which is what lets the core's thread pool encode on every core.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading

from vmdelta_core.plugin import PluginError

__all__ = ["ENOSPC", "XD3_COMPLEVEL_SHIFT", "XD3_NOCOMPRESS", "Xdelta3Library", "load_library"]

ENOSPC = 28  # the output did not fit in the buffer
XD3_NOCOMPRESS = 1 << 13  # search the source only, leave literal data uncompressed
XD3_COMPLEVEL_SHIFT = 20  # bits 20-23: the -1..-9 level of the command line


class Xdelta3Library:
    """The two calls the encoder needs, with argument types fixed once."""

    def __init__(self, path: str) -> None:
        try:
            lib = ctypes.CDLL(path)
            encode, decode, strerror = lib.xd3_encode_memory, lib.xd3_decode_memory, lib.xd3_strerror
        except (OSError, AttributeError) as exc:
            raise PluginError(f"xdelta3: {path} does not export the xdelta3 memory API ({exc})") from None
        self.path = path
        self.usize = self._probe_usize(encode)
        usize = ctypes.c_uint64 if self.usize == 8 else ctypes.c_uint32
        # int xd3_*_memory(const uint8_t *input, usize_t input_size, const uint8_t *source,
        #                  usize_t source_size, uint8_t *output, usize_t *output_size,
        #                  usize_t avail_output, int flags)
        argtypes = [
            ctypes.c_char_p,
            usize,
            ctypes.c_char_p,
            usize,
            ctypes.c_char_p,
            ctypes.POINTER(usize),
            usize,
            ctypes.c_int,
        ]
        for fn in (encode, decode):
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        strerror.argtypes = [ctypes.c_int]
        strerror.restype = ctypes.c_char_p
        self._encode, self._decode, self._strerror = encode, decode, strerror
        self._usize_type = usize
        # xdelta3 builds its RFC 3284 code table lazily in a static array on first use; doing one
        # round trip here, before any worker thread exists, keeps that race from ever happening
        sample = bytes(range(256)) * 4
        if self.decode(sample, self.encode(sample, sample[::-1], len(sample), 0) or b"", len(sample))[0] != 0:
            raise PluginError(f"xdelta3: the library in {path} fails a round trip")

    @staticmethod
    def _probe_usize(encode: ctypes._CFuncPtr) -> int:
        """Whether this build's ``usize_t`` is 32 or 64 bits: see how much of the size it writes.

        The package's build defines ``SIZEOF_SIZE_T=8``, which makes it 64 bits, but a different
        build of the same sources may not; passing 32-bit values where 64-bit ones are expected is
        harmless on x86-64 and arm64, so only the written size tells them apart.
        """
        encode.argtypes = None
        encode.restype = ctypes.c_int
        source = b"probe" * 20
        out = ctypes.create_string_buffer(256)
        written = ctypes.c_uint64(0xA5A5A5A5A5A5A5A5)
        status = encode(
            source,
            ctypes.c_uint32(len(source)),
            source,
            ctypes.c_uint32(len(source)),
            out,
            ctypes.byref(written),
            ctypes.c_uint32(256),
            ctypes.c_int(0),
        )
        if status != 0:
            raise PluginError(f"xdelta3: probing the library failed with status {status}")
        return 4 if written.value >> 32 == 0xA5A5A5A5 else 8

    def strerror(self, status: int) -> str:
        text = self._strerror(status)
        return text.decode(errors="replace") if text else f"error {status}"

    def encode(self, source: bytes, target: bytes, avail: int, flags: int) -> bytes | None:
        """The VCDIFF delta of ``target`` against ``source`` if it fits in ``avail`` bytes."""
        out = ctypes.create_string_buffer(max(avail, 1))
        size = self._usize_type(0)
        status = self._encode(target, len(target), source, len(source), out, ctypes.byref(size), avail, flags)
        if status == ENOSPC:
            return None
        if status != 0:
            raise PluginError(f"xdelta3: encoding failed: {self.strerror(status)}")
        return out.raw[: size.value]

    def decode(self, source: bytes, payload: bytes, length: int) -> tuple[int, bytes]:
        """(status, output); the output buffer is exactly ``length`` bytes, never more."""
        out = ctypes.create_string_buffer(max(length, 1))
        size = self._usize_type(0)
        status = self._decode(payload, len(payload), source, len(source), out, ctypes.byref(size), length, 0)
        if status == 0 and size.value != length:
            return -1, b""
        return status, out.raw[:length]


_lock = threading.Lock()
_library: Xdelta3Library | None = None


def load_library() -> Xdelta3Library:
    """The library, loaded once per process (thread-safe)."""
    global _library
    with _lock:
        if _library is None:
            spec = importlib.util.find_spec("_xdelta3")
            if spec is None or not spec.origin:
                raise PluginError("xdelta3: the xdelta3 library is missing; pip install 'xdelta3==0.0.5'")
            _library = Xdelta3Library(spec.origin)
        return _library
