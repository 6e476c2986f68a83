"""Limits and defaults the command line shows, defined where importing them costs nothing: the
modules that use them (the format, the configs, the exporters) import numpy and more, which
``vmdelta --help`` and the first byte of a ``vmdelta send`` should not wait for."""

from __future__ import annotations

__all__ = ["DEFAULT_CODEC", "DEFAULT_FRAME", "ELIJAH_BLOB_SIZE", "ELIJAH_LEVEL", "MAX_THREADS", "MAX_UNIT", "MIN_UNIT"]

#: units are whole sectors, and an item's u16 length holds at most this many bytes
MIN_UNIT = 512
MAX_UNIT = 65024
#: worker threads; each may hold two frames in flight, so this also bounds memory
MAX_THREADS = 1024
#: the frame codec when none is named
DEFAULT_CODEC = "zstd"
#: uncompressed bytes of a frame: a streamed frame is decoded only once it has arrived whole, so
#: small frames keep a receiver working right behind the link (and both cores busy on a small
#: image); 1 MiB costs under 1% of size against 4 MiB
DEFAULT_FRAME = 1 << 20
#: xz preset of an exported original overlay package: the original compressed its blobs with LZMA at level 5
ELIJAH_LEVEL = 5
#: uncompressed item bytes per blob of such a package: small enough to fetch one on demand
ELIJAH_BLOB_SIZE = 4 << 20
