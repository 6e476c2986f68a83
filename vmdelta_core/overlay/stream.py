"""Reading a stream-form overlay front to back, without seeking (``schemas/overlay-v1-stream.md``).

The prologue arrives first; then each frame, headed by its index entry and checked against its
checksum as it arrives; then the epilogue, the index (which must repeat the entries the frames
came with) and the trailer, whose checksum covers every byte before it. Nothing is trusted for
more than it has been checked for: a frame once its checksum holds, the whole overlay only once
the trailer's does. Memory holds one frame at a time.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import construct
import xxhash

from vmdelta_core.errors import FormatError, IntegrityError
from vmdelta_core.overlay.container import (
    CHECKSUM_FIELD,
    ENTRY_SIZE,
    FLAG_STREAM,
    FORMAT_VERSION,
    HEADER_SIZE,
    LENGTH_FIELD,
    MAX_METADATA,
    TAG_EPILOGUE,
    TAG_FRAME,
    TAG_PROLOGUE,
    TRAILER_SIZE,
    FrameEntry,
    check_entry,
    decode_document,
    unpack_entry,
)
from vmdelta_core.overlay.parts import join_document
from vmdelta_core.overlay.schema import HEADER, OVERLAY_MAGIC, TRAILER, TRAILER_MAGIC

__all__ = ["StreamReader"]

_INDEX_STEP = 1 << 20


class StreamReader:
    """A stream-form overlay read from ``file`` (a pipe, a socket, a FIFO) in one pass.

    :param name: what the messages call it (``"standard input"``).
    """

    def __init__(self, file: BinaryIO, name: str) -> None:
        self.file = file
        self.name = name
        self._hash = xxhash.xxh3_64()
        self._entries = xxhash.xxh3_64()  # of the entries the frames came with, as the index must be
        self._count = 0
        self.offset = 0
        self.metadata: dict[str, Any] | None = None  # the whole document, once the end is checked
        head = self._read(HEADER_SIZE, "its header")
        if head[: len(OVERLAY_MAGIC)] != OVERLAY_MAGIC:
            raise FormatError(f"{name}: not a vmdelta overlay (bad magic)")
        header = HEADER.parse(head)
        if header.version != FORMAT_VERSION:
            raise FormatError(f"{name}: overlay format version {header.version}; this vmdelta reads {FORMAT_VERSION}")
        if header.flags != FLAG_STREAM or header.reserved:
            what = "a file-form overlay, which is read from its end" if header.flags == 0 else "unknown flags"
            raise FormatError(f"{name}: {what} ({header.flags:#x}); a stream needs the stream form (vmdelta convert)")
        if self._read(1, "its prologue") != TAG_PROLOGUE:
            raise FormatError(f"{name}: stream-form overlay without its prologue")
        (length,) = LENGTH_FIELD.unpack(self._read(LENGTH_FIELD.size, "its prologue"))
        if length > MAX_METADATA:
            raise FormatError(f"{name}: overlay prologue claims {length} bytes")
        at = self.offset
        body = self._read(length, "its prologue")
        (checksum,) = CHECKSUM_FIELD.unpack(self._read(CHECKSUM_FIELD.size, "its prologue"))
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise IntegrityError(f"{name}: overlay prologue checksum mismatch")
        #: what a reader needs before the frames (:func:`~vmdelta_core.overlay.parts.split_document`)
        self.prologue = decode_document(body, f"{name}: overlay prologue", at)

    def _read(self, count: int, what: str, *, hashed: bool = True) -> bytes:
        """Exactly ``count`` bytes, or a FormatError saying the stream was cut short."""
        chunks, need = [], count
        while need:
            chunk = self.file.read(need)
            if not chunk:
                raise FormatError(f"{self.name}: overlay cut short at byte {self.offset} (in {what})")
            chunks.append(chunk)
            need -= len(chunk)
            self.offset += len(chunk)
        data = b"".join(chunks)
        if hashed:
            self._hash.update(data)
        return data

    def next_frame(self) -> tuple[FrameEntry, bytes] | None:
        """The next frame and its stored bytes, checked; ``None`` once the end is read and checked."""
        if self.metadata is not None:
            return None
        tag = self._read(1, "a frame's head")
        if tag == TAG_EPILOGUE:
            self._read_end()
            return None
        if tag != TAG_FRAME:
            raise FormatError(f"{self.name}: byte {self.offset - 1} is not a frame or the epilogue ({tag.hex()})")
        raw = self._read(ENTRY_SIZE, "a frame's head")
        where = f"{self.name}: frame at byte {self.offset}"
        entry = unpack_entry(raw, where)
        check_entry(entry, where)
        if entry.file_offset != self.offset:
            raise FormatError(f"{where}: its head says it lies at byte {entry.file_offset}")
        stored = self._read(entry.stored_length, "a frame")
        if xxhash.xxh3_64_intdigest(stored) != entry.checksum:
            raise IntegrityError(f"{where} is damaged (checksum mismatch)")
        self._entries.update(raw)
        self._count += 1
        return entry, stored

    def _read_end(self) -> None:
        """Epilogue, index and trailer: every check the file form's reader makes, then the end."""
        (length,) = LENGTH_FIELD.unpack(self._read(LENGTH_FIELD.size, "the epilogue"))
        if length > MAX_METADATA:
            raise FormatError(f"{self.name}: overlay epilogue claims {length} bytes")
        meta_offset = self.offset
        meta = self._read(length, "the epilogue")
        index_offset = self.offset
        index_hash = xxhash.xxh3_64()
        remaining = self._count * ENTRY_SIZE
        while remaining:
            chunk = self._read(min(remaining, _INDEX_STEP), "the frame index")
            index_hash.update(chunk)
            remaining -= len(chunk)
        head = self._read(TRAILER_SIZE - 16, "the trailer")
        computed = self._hash.intdigest()
        tail = self._read(16, "the trailer", hashed=False)
        try:
            trailer = TRAILER.parse(head + tail)
        except construct.ConstructError:
            raise FormatError(f"{self.name}: overlay trailer is missing or damaged") from None
        if (
            trailer.metadata_offset != meta_offset
            or trailer.metadata_length != length
            or trailer.index_offset != index_offset
            or trailer.index_count != self._count
            or tail[8:] != TRAILER_MAGIC
        ):
            raise FormatError(f"{self.name}: overlay trailer does not describe the stream it ends")
        if xxhash.xxh3_64_intdigest(meta) != trailer.metadata_checksum:
            raise IntegrityError(f"{self.name}: overlay epilogue checksum mismatch")
        if index_hash.intdigest() != trailer.index_checksum or index_hash.intdigest() != self._entries.intdigest():
            raise IntegrityError(f"{self.name}: overlay frame index does not match the frames that came")
        if computed != trailer.file_checksum:
            raise IntegrityError(f"{self.name}: overlay checksum mismatch: the stream is damaged")
        if self.file.read(1):
            raise FormatError(f"{self.name}: data after the end of the overlay")
        epilogue = decode_document(meta, f"{self.name}: overlay epilogue", meta_offset)
        self.metadata = join_document(self.prologue, epilogue)
