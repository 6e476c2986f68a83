"""The overlay container, version 1 (``schemas/overlay-v1.md`` describes every byte).

::

    header (16 B) | frames ... | metadata (JSON) | frame index (48 B each) | trailer (64 B)

Frames hold whole DeltaItems of one image in address order, each frame compressed on its own and
checksummed, so apply streams them and a reader can fetch any one. Everything a reader needs to
start (metadata, index) is found from the trailer, so the writer streams too.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import construct
import numpy as np
import xxhash

from vmdelta_core.components import Codec
from vmdelta_core.errors import FormatError, IntegrityError
from vmdelta_core.fileio import open_regular
from vmdelta_core.overlay.items import MIN_ITEM, ItemColumns, item_sizes, pack_items, unpack_items
from vmdelta_core.overlay.layout import (
    CHECKSUM_FIELD,
    FLAG_STREAM,
    FORMAT_VERSION,
    HEADER_SIZE,
    LENGTH_FIELD,
    MAX_METADATA,
)
from vmdelta_core.overlay.parts import join_document, split_document
from vmdelta_core.overlay.schema import FRAME_INDEX_ENTRY, HEADER, OVERLAY_MAGIC, TRAILER, TRAILER_MAGIC

__all__ = ["FLAG_STREAM", "FORMAT_VERSION", "FrameEntry", "OverlayReader", "OverlayWriter"]

TRAILER_SIZE = TRAILER.sizeof()
ENTRY_SIZE = FRAME_INDEX_ENTRY.sizeof()
MAX_FRAME = 64 << 20  # no frame, stored or decompressed, may be larger (untrusted input)
KIND_ITEMS = "items"
KIND_ENVELOPE = "envelope"
TAG_PROLOGUE = b"P"
TAG_FRAME = b"F"
TAG_EPILOGUE = b"E"
#: a frame's head in the stream form: its tag and its index entry
FRAME_HEAD_SIZE = 1 + 48


def pack_entry(entry: FrameEntry) -> bytes:
    """The 48 bytes of an index entry."""
    return FRAME_INDEX_ENTRY.build(attrs.asdict(entry))


def unpack_entry(data: bytes, where: str) -> FrameEntry:
    """An index entry from its 48 bytes.

    :raises FormatError: naming ``where``.
    """
    try:
        raw = FRAME_INDEX_ENTRY.parse(data)
    except construct.ConstructError:
        raise FormatError(f"{where} is damaged") from None
    return FrameEntry(
        raw.file_offset,
        raw.stored_length,
        raw.length,
        raw.image,
        str(raw.kind),
        raw.codec,
        raw.item_count,
        raw.first_offset,
        raw.end_offset,
        raw.checksum,
    )


def check_entry(entry: FrameEntry, where: str) -> None:
    """What one index entry says must be possible, before anything trusts it."""
    if entry.stored_length > MAX_FRAME or entry.length > MAX_FRAME:
        raise FormatError(f"{where}: a frame larger than {MAX_FRAME} bytes")
    if entry.kind == KIND_ENVELOPE:
        if entry.item_count or entry.first_offset or entry.end_offset:
            raise FormatError(f"{where}: an envelope frame with items")
    elif entry.kind != KIND_ITEMS:
        raise FormatError(f"{where}: unknown frame kind {entry.kind}")
    elif not 0 < entry.item_count <= entry.length // MIN_ITEM:
        raise FormatError(f"{where}: {entry.item_count} items cannot fill {entry.length} bytes")
    elif entry.first_offset >= entry.end_offset:
        raise FormatError(f"{where}: its items end at {entry.end_offset}, before they start")


def decode_document(data: bytes, what: str, at: int) -> dict[str, Any]:
    """A JSON object of an overlay (metadata, prologue, epilogue), or one FormatError naming
    ``what`` and the byte ``at`` which it starts."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise FormatError(f"{what} at byte {at} nests too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise FormatError(f"{what} at byte {at} is not usable JSON: {exc}") from None
    if not isinstance(document, dict):
        raise FormatError(f"{what} is not a JSON object")
    return document


#: ``read(image number, offset, length)``: bytes of that image's base, for codecs that read it
BaseRead = Callable[[int, int, int], bytes]


def frame_items(
    entry: FrameEntry, stored: bytes, codec: Codec, where: str, read_base: BaseRead | None = None
) -> ItemColumns:
    """The items of one stored frame, decompressed and parsed; they lie where its entry says.

    A codec that ``reads_base`` (``zstd-base``) decompresses against the base of the frame's
    image, read through ``read_base``; without it such a frame is refused.

    Memory: the stored frame, its ``entry.length`` decompressed bytes (at most
    :data:`MAX_FRAME`) and the columns, about four times that.
    """
    data = decompress_frame(entry, stored, codec, where, read_base)
    if len(data) != entry.length:
        raise FormatError(f"{where} decompresses to {len(data)} bytes, the index says {entry.length}")
    try:
        columns = unpack_items(data)
    except FormatError as exc:
        raise FormatError(f"{where} (decompressed): {exc}") from None
    if len(columns) != entry.item_count:
        raise FormatError(f"{where} holds {len(columns)} items, the index says {entry.item_count}")
    ends = columns.offsets + columns.lengths.astype(np.uint64)
    if (
        columns.offsets[0] != entry.first_offset
        or ends[-1] != entry.end_offset
        or (columns.offsets < entry.first_offset).any()
        or (ends > entry.end_offset).any()
        or (ends < columns.offsets).any()
    ):
        raise FormatError(
            f"{where}: its items reach outside the range the index gives it "
            f"({entry.first_offset} to {entry.end_offset})"
        )
    return columns


def decompress_frame(
    entry: FrameEntry, stored: bytes, codec: Codec, where: str, read_base: BaseRead | None = None
) -> bytes:
    """A frame's bytes, decompressed by ``codec`` (against its image's base when the codec reads one)."""
    if not getattr(codec, "reads_base", False):
        return codec.decompress(stored, entry.length)
    if read_base is None:
        raise FormatError(f"{where} is compressed against its base ({codec.name}); this reader has no base")
    image = entry.image
    return codec.decompress_frame(stored, entry.length, lambda offset, length: read_base(image, offset, length))  # type: ignore[attr-defined]


def encode_json(document: Mapping[str, Any]) -> bytes:
    """A metadata document as overlays store it: sorted keys, no insignificant white space."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@attrs.frozen
class FrameEntry:
    """One frame as the index describes it."""

    file_offset: int
    stored_length: int
    length: int
    image: int
    kind: str
    codec: int
    item_count: int
    first_offset: int
    end_offset: int
    checksum: int


class OverlayWriter:
    """Streams an overlay to ``file``: frames as they fill, metadata and index at the end.

    In the stream form (``stream=True``) :meth:`begin` writes the prologue before any frame, each
    frame is headed by its index entry, and the metadata at the end is the epilogue; ``file``
    then need not be seekable (a pipe, a socket).
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        codec: Codec,
        codec_id: int,
        level: int | None,
        frame_size: int,
        pool: ThreadPoolExecutor,
        in_flight: int = 4,
        stream: bool = False,
    ) -> None:
        self.file = file
        self.codec = codec
        self.codec_id = codec_id
        self.level = level
        self.frame_size = frame_size
        self.pool = pool
        self.in_flight = max(1, in_flight)
        self.stream = stream
        self._hash = xxhash.xxh3_64()
        self._offset = 0
        self._begun = not stream
        self._entries: list[FrameEntry] = []
        self._pending: collections.deque[tuple[Future[bytes], dict[str, Any], bytes]] = collections.deque()
        #: (image, ref) -> stored bytes, each frame's stored size shared out by its items' sizes
        self.stored_bytes_by_ref: dict[tuple[int, int], float] = collections.defaultdict(float)
        self._parts: list[bytes] = []
        self._part_bytes = 0
        self._frame: dict[str, Any] | None = None
        self.stored_bytes_by_image: dict[int, int] = collections.defaultdict(int)
        flags = FLAG_STREAM if stream else 0
        self._write(HEADER.build({"version": FORMAT_VERSION, "flags": flags, "reserved": 0}))

    @classmethod
    def copying(cls, file: BinaryIO, *, stream: bool) -> OverlayWriter:
        """A writer that only copies frames already stored (:meth:`add_stored`): it compresses
        nothing, so it needs no codec and no threads."""
        return cls(file, codec=None, codec_id=0, level=None, frame_size=MAX_FRAME, pool=None, stream=stream)  # type: ignore[arg-type]

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self._hash.update(data)
        self._offset += len(data)

    def begin(self, prologue: Mapping[str, Any]) -> None:
        """Write the stream form's prologue (:func:`~vmdelta_core.overlay.metadata.split_document`);
        nothing in the file form, whose metadata all comes at the end."""
        if not self.stream:
            return
        if self._begun:
            raise ValueError("the prologue is written once, before any frame")
        data = encode_json(prologue)
        if len(data) > MAX_METADATA:
            raise FormatError(f"overlay prologue of {len(data)} bytes is larger than {MAX_METADATA}")
        self._write(
            TAG_PROLOGUE + LENGTH_FIELD.pack(len(data)) + data + CHECKSUM_FIELD.pack(xxhash.xxh3_64_intdigest(data))
        )
        self._begun = True

    def _emit(self, entry: FrameEntry, stored: bytes) -> None:
        """Write one stored frame described by ``entry`` (its ``file_offset`` is set here)."""
        if not self._begun:
            raise ValueError("a stream-form overlay needs its prologue before its first frame")
        if self.stream:
            entry = attrs.evolve(entry, file_offset=self._offset + FRAME_HEAD_SIZE)
            self._write(TAG_FRAME + pack_entry(entry))
        else:
            entry = attrs.evolve(entry, file_offset=self._offset)
        self._entries.append(entry)
        self._write(stored)

    # ----------------------------------------------------------------------------------------

    def add_items(
        self,
        image: int,
        offsets: np.ndarray,
        lengths: np.ndarray,
        refs: np.ndarray,
        types: np.ndarray,
        values: np.ndarray,
        payloads: list[Any],
    ) -> None:
        """Append items of ``image`` (address order, after every item already added for it)."""
        if offsets.shape[0] == 0:
            return
        if self._frame is not None and self._frame["image"] != image:
            self._close_frame()
        sizes = item_sizes(refs, types, payloads)
        start = 0
        n = offsets.shape[0]
        while start < n:
            room = self.frame_size - self._part_bytes
            fits = int(np.searchsorted(np.cumsum(sizes[start:]), room, side="right"))
            if fits == 0 and self._part_bytes:
                self._close_frame()
                continue
            stop = start + max(fits, 1)
            if self._frame is None:
                self._frame = {"image": image, "count": 0, "first": int(offsets[start]), "end": 0, "by_ref": {}}
            by_ref = self._frame["by_ref"]
            piece_refs, piece_sizes = refs[start:stop], sizes[start:stop]
            for ref in np.unique(piece_refs).tolist():
                by_ref[ref] = by_ref.get(ref, 0) + int(piece_sizes[piece_refs == ref].sum())
            self._parts.append(
                pack_items(
                    offsets[start:stop],
                    lengths[start:stop],
                    refs[start:stop],
                    types[start:stop],
                    values[start:stop],
                    payloads[start:stop],
                )
            )
            self._part_bytes += int(sizes[start:stop].sum())
            self._frame["count"] += stop - start
            self._frame["end"] = int(offsets[stop - 1]) + int(lengths[stop - 1])
            start = stop
            if self._part_bytes >= self.frame_size:
                self._close_frame()

    def add_envelope(self, image: int, stored: bytes, length: int) -> None:
        """Store an image's envelope, already compressed against the base's envelope."""
        self._close_frame()
        self._drain(0)
        checksum = xxhash.xxh3_64_intdigest(stored)
        self._emit(FrameEntry(0, len(stored), length, image, KIND_ENVELOPE, 0, 0, 0, 0, checksum), stored)

    def add_stored(self, entry: FrameEntry, stored: bytes) -> None:
        """Copy a frame as another overlay stored it (``vmdelta convert``): same bytes, same
        entry but for where it lies."""
        self.flush()
        if xxhash.xxh3_64_intdigest(stored) != entry.checksum or len(stored) != entry.stored_length:
            raise IntegrityError(f"frame at byte {entry.file_offset} does not match its index entry")
        self._emit(entry, stored)

    def _close_frame(self) -> None:
        if self._frame is None:
            return
        data = b"".join(self._parts)
        self._parts, self._part_bytes = [], 0
        frame, self._frame = self._frame, None
        compress_frame = getattr(self.codec, "compress_frame", None)
        if compress_frame is not None:  # a codec that picks what to compress against per image
            future = self.pool.submit(compress_frame, frame["image"], data, self.level)
        else:
            future = self.pool.submit(self.codec.compress, data, self.level)
        self._pending.append((future, frame, data))
        self._drain(self.in_flight)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            future, frame, data = self._pending.popleft()
            stored = future.result()
            if len(stored) > MAX_FRAME:
                raise FormatError(f"codec {self.codec.name} produced a frame over {MAX_FRAME} bytes")
            entry = FrameEntry(
                0,
                len(stored),
                len(data),
                frame["image"],
                KIND_ITEMS,
                self.codec_id,
                frame["count"],
                frame["first"],
                frame["end"],
                xxhash.xxh3_64_intdigest(stored),
            )
            self.stored_bytes_by_image[frame["image"]] += len(stored)
            for ref, nbytes in frame["by_ref"].items():
                self.stored_bytes_by_ref[frame["image"], ref] += len(stored) * nbytes / max(len(data), 1)
            self._emit(entry, stored)
            if self.stream:
                self.file.flush()  # a frame leaves as soon as it is made

    def flush(self) -> None:
        """Compress and write every pending frame (the per-image byte counts are then final)."""
        self._close_frame()
        self._drain(0)

    def finish(self, metadata: Mapping[str, Any]) -> int:
        """Write metadata (the epilogue in the stream form), index and trailer; returns the
        overlay's size in bytes."""
        self.flush()
        if not self._begun:
            raise ValueError("a stream-form overlay needs its prologue")
        if self.stream:
            meta = encode_json(split_document(metadata)[1])
            self._write(TAG_EPILOGUE + LENGTH_FIELD.pack(len(meta)))
        else:
            meta = encode_json(metadata)
        meta_offset = self._offset
        self._write(meta)
        index = b"".join(pack_entry(e) for e in self._entries)
        index_offset = self._offset
        self._write(index)
        head = TRAILER.build(
            {
                "metadata_offset": meta_offset,
                "metadata_length": len(meta),
                "metadata_checksum": xxhash.xxh3_64_intdigest(meta),
                "index_offset": index_offset,
                "index_count": len(self._entries),
                "index_checksum": xxhash.xxh3_64_intdigest(index),
                "file_checksum": 0,
            }
        )[: TRAILER_SIZE - 16]
        self._write(head)
        checksum = self._hash.intdigest()
        self._write(checksum.to_bytes(8, "big") + TRAILER_MAGIC)
        return self._offset

    def abort(self) -> None:
        for future, _, _ in self._pending:
            future.cancel()
        self._pending.clear()


def _open_regular(path: Path) -> BinaryIO:
    """Open an overlay for reading. Overlays are read from the back and more than once, which a
    pipe cannot do: only a regular file will do."""
    return os.fdopen(open_regular(path, "overlay"), "rb")


class OverlayReader:
    """Reads and checks an overlay. Opening it checks structure; :meth:`verify` checks all bytes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = _open_regular(self.path)
        try:
            self._read_structure()
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> OverlayReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.file.fileno(), length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: overlay is cut short at byte {offset + len(data)}")
        return data

    def _read_structure(self) -> None:
        size = os.fstat(self.file.fileno()).st_size
        self.size = size
        if size < HEADER_SIZE + TRAILER_SIZE:
            raise FormatError(f"{self.path}: too short to be an overlay ({size} bytes)")
        head = self._pread(0, HEADER_SIZE)
        if head[:8] != OVERLAY_MAGIC:
            raise FormatError(f"{self.path}: not a vmdelta overlay (bad magic)")
        header = HEADER.parse(head)
        if header.version != FORMAT_VERSION:
            raise FormatError(
                f"{self.path}: overlay format version {header.version}; this vmdelta reads {FORMAT_VERSION}"
            )
        if header.flags & ~FLAG_STREAM or header.reserved:
            raise FormatError(f"{self.path}: overlay header has unknown flags set ({header.flags:#x})")
        try:
            trailer = TRAILER.parse(self._pread(size - TRAILER_SIZE, TRAILER_SIZE))
        except construct.ConstructError:
            raise FormatError(
                f"{self.path}: overlay trailer is missing or damaged (the file may be cut short)"
            ) from None
        end = size - TRAILER_SIZE
        m_off, m_len = trailer.metadata_offset, trailer.metadata_length
        i_off, i_count = trailer.index_offset, trailer.index_count
        if not (
            m_off >= HEADER_SIZE
            and m_len <= MAX_METADATA
            and m_off + m_len == i_off
            and i_count <= end // ENTRY_SIZE
            and i_off + i_count * ENTRY_SIZE == end
        ):
            raise FormatError(f"{self.path}: overlay trailer points outside the file")
        self.file_checksum = trailer.file_checksum
        meta_bytes = self._pread(m_off, m_len)
        if xxhash.xxh3_64_intdigest(meta_bytes) != trailer.metadata_checksum:
            raise IntegrityError(f"{self.path}: overlay metadata checksum mismatch")
        document = decode_document(meta_bytes, f"{self.path}: overlay metadata", m_off)
        self.stream_form = bool(header.flags & FLAG_STREAM)
        pos = HEADER_SIZE
        if self.stream_form:
            prologue, pos = self._read_prologue()
            document = join_document(prologue, document)
        self.metadata: dict[str, Any] = document
        index_bytes = self._pread(i_off, i_count * ENTRY_SIZE)
        if xxhash.xxh3_64_intdigest(index_bytes) != trailer.index_checksum:
            raise IntegrityError(f"{self.path}: overlay frame index checksum mismatch")
        self.frames: list[FrameEntry] = []
        head = FRAME_HEAD_SIZE if self.stream_form else 0
        for k in range(i_count):
            data = index_bytes[k * ENTRY_SIZE : (k + 1) * ENTRY_SIZE]
            entry = unpack_entry(data, f"{self.path}: frame index entry {k}")
            if entry.file_offset != pos + head:
                raise FormatError(f"{self.path}: frame {k} lies outside its place in the file")
            if head and self._pread(pos, head) != TAG_FRAME + data:
                # the stream form says each frame twice: both must agree, as a stream reader checks
                raise FormatError(f"{self.path}: the head of frame {k} differs from its index entry")
            check_entry(entry, f"{self.path}: frame index entry {k} (at byte {i_off + k * ENTRY_SIZE})")
            pos = entry.file_offset + entry.stored_length
            self.frames.append(entry)
        if pos + (len(TAG_EPILOGUE) + LENGTH_FIELD.size if self.stream_form else 0) != m_off:
            raise FormatError(f"{self.path}: frames do not fill the space before the metadata")
        if self.stream_form and self._pread(pos, 5) != TAG_EPILOGUE + LENGTH_FIELD.pack(m_len):
            raise FormatError(f"{self.path}: the epilogue's head differs from the trailer")

    def _read_prologue(self) -> tuple[dict[str, Any], int]:
        """The stream form's prologue, and where the first frame's head starts."""
        at = HEADER_SIZE
        head = self._pread(at, 1 + LENGTH_FIELD.size)
        if head[:1] != TAG_PROLOGUE:
            raise FormatError(f"{self.path}: stream-form overlay without its prologue")
        (length,) = LENGTH_FIELD.unpack(head[1:])
        if length > MAX_METADATA:
            raise FormatError(f"{self.path}: overlay prologue claims {length} bytes")
        data = self._pread(at + len(head), length + CHECKSUM_FIELD.size)
        body, (checksum,) = data[:length], CHECKSUM_FIELD.unpack(data[length:])
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise IntegrityError(f"{self.path}: overlay prologue checksum mismatch")
        return decode_document(body, f"{self.path}: overlay prologue", at), at + len(head) + len(data)

    # ----------------------------------------------------------------------------------------

    def verify(self, progress: Callable[[int], None] | None = None) -> None:
        """Check the whole-file checksum (every byte before the trailer's last 16)."""
        h = xxhash.xxh3_64()
        remaining = self.size - 16
        offset = 0
        while remaining:
            step = min(remaining, 8 << 20)
            chunk = self._pread(offset, step)
            h.update(chunk)
            offset += step
            remaining -= step
            if progress is not None:
                progress(step)
        if h.intdigest() != self.file_checksum:
            raise IntegrityError(f"{self.path}: overlay checksum mismatch: the file is damaged")

    def stored(self, entry: FrameEntry) -> bytes:
        """A frame's bytes as stored, after checking its checksum."""
        data = self._pread(entry.file_offset, entry.stored_length)
        if xxhash.xxh3_64_intdigest(data) != entry.checksum:
            raise IntegrityError(f"{self.path}: frame at byte {entry.file_offset} is damaged (checksum mismatch)")
        return data

    def items(self, entry: FrameEntry, codec: Codec) -> ItemColumns:
        """The items of one frame, checked (:func:`frame_items`)."""
        return frame_items(entry, self.stored(entry), codec, f"{self.path}: frame at byte {entry.file_offset}")

    def frames_of(self, image: int, kind: str = KIND_ITEMS) -> Iterator[FrameEntry]:
        return (e for e in self.frames if e.image == image and e.kind == kind)
