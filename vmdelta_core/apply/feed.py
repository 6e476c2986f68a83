"""Where apply's frames come from: an overlay file read at random, or a stream read as it arrives.

Both hand out the same things in the same order (the metadata to start with, then per image its
item frames in address order and its envelope, then the whole metadata), so the stages after
them do not know which they read. A file is verified whole before anything is trusted; a stream
frame by frame as it arrives, and as a whole only at its end, which is why apply checks the
rebuilt images and commits its outputs only after :meth:`finish`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from vmdelta_core.errors import FormatError
from vmdelta_core.overlay.container import KIND_ENVELOPE, FrameEntry, OverlayReader
from vmdelta_core.overlay.metadata import OverlayMetadata
from vmdelta_core.overlay.stream import StreamReader
from vmdelta_core.records import Progress

__all__ = ["FileFeed", "StreamFeed", "open_feed"]

Frame = tuple[FrameEntry, bytes]


class FileFeed:
    """An overlay file (either form), read at random through its index."""

    partial = False

    def __init__(self, reader: OverlayReader) -> None:
        self.reader = reader
        self.name = str(reader.path)

    def start(self, progress: Progress) -> dict[str, Any]:
        self.reader.verify(progress.start("verify overlay", self.reader.size))
        return self.reader.metadata

    @property
    def frames_seen(self) -> list[FrameEntry]:
        return self.reader.frames

    def bind(self, meta: OverlayMetadata) -> None:
        """The checked metadata the frames must agree with (checked with the index already)."""

    def frames(self, number: int) -> Iterator[Frame]:
        for entry in self.reader.frames_of(number):
            yield entry, self.reader.stored(entry)

    def reach(self, number: int) -> int:
        return max((entry.end_offset for entry in self.reader.frames_of(number)), default=0)

    def envelope(self, number: int) -> Frame | None:
        entries = list(self.reader.frames_of(number, KIND_ENVELOPE))
        if len(entries) > 1:
            raise FormatError(f"image {number} has {len(entries)} envelopes")
        return (entries[0], self.reader.stored(entries[0])) if entries else None

    def finish(self) -> dict[str, Any]:
        return self.reader.metadata

    def close(self) -> None:
        self.reader.close()


class ReadAhead:
    """Frames of a stream read by a thread of their own, each checked against its checksum, and
    held until asked for, up to ``budget`` bytes (and one frame) ahead.

    The sender is never kept waiting while apply checks the bases or rebuilds a frame: the link
    carries the next frames meanwhile. What the reader raises (a cut or damaged stream) is
    raised by :meth:`next` in its place in the stream, after every frame before it.
    """

    def __init__(self, reader: StreamReader, budget: int) -> None:
        self.reader = reader
        self.budget = budget
        self._cond = threading.Condition()
        self._frames: collections.deque[Frame] = collections.deque()
        self._held = 0
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vmdelta-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._held < self.budget or self._closed)
                    if self._closed:
                        return
                frame = self.reader.next_frame()
                with self._cond:
                    if frame is None:
                        self._ended = True
                    else:
                        self._frames.append(frame)
                        self._held += len(frame[1])
                    self._cond.notify_all()
                if frame is None:
                    return
        except BaseException as exc:  # handed to the thread that asks for the frame
            with self._cond:
                self._error = exc
                self._ended = True
                self._cond.notify_all()

    def next(self) -> Frame | None:
        """The next frame, checked; ``None`` once the end of the stream is read and checked."""
        with self._cond:
            self._cond.wait_for(lambda: self._frames or self._ended)
            if self._frames:
                frame = self._frames.popleft()
                self._held -= len(frame[1])
                self._cond.notify_all()
                return frame
            if self._error is not None:
                raise self._error
            return None

    def close(self) -> None:
        """Stop reading ahead (a read already waiting on the stream ends with the stream)."""
        with self._cond:
            self._closed = True
            self._frames.clear()
            self._cond.notify_all()


#: bytes of stored frames read ahead of the one being applied, at most (and one frame more)
READ_AHEAD = 32 << 20


class StreamFeed:
    """A stream-form overlay read front to back as it arrives (a pipe, a socket, a FIFO).

    Once the prologue is checked (:meth:`bind`), frames are read ahead by a :class:`ReadAhead`
    while the bases are checked and earlier frames applied. One frame is looked ahead here, to
    know where an image's frames end; envelopes are kept until their image asks (at most one
    per image, each at most a frame).
    """

    partial = True

    def __init__(self, reader: StreamReader, closer: Any = None) -> None:
        self.reader = reader
        self.name = reader.name
        self._closer = closer
        self._ahead: Frame | None = None
        self._ended = False
        self._envelopes: dict[int, Frame] = {}
        self._reach: dict[int, int] = {}
        self._sizes: list[int] = []
        self._current = -1
        self._read_ahead: ReadAhead | None = None

    def start(self, progress: Progress) -> dict[str, Any]:
        return self.reader.prologue

    @property
    def frames_seen(self) -> list[FrameEntry]:
        return []  # each frame is checked as it arrives (bind), none is kept

    def bind(self, meta: OverlayMetadata) -> None:
        """The checked prologue each arriving frame must agree with; frames are read from now on."""
        self._sizes = [image.size for image in meta.images]
        self._read_ahead = ReadAhead(self.reader, READ_AHEAD)

    def _next(self) -> Frame | None:
        return self._read_ahead.next() if self._read_ahead is not None else self.reader.next_frame()

    def _peek(self) -> Frame | None:
        if self._ahead is None and not self._ended:
            self._ahead = self._next()
            self._ended = self._ahead is None
            if self._ahead is not None:
                self._check(self._ahead[0])
        return self._ahead

    def _check(self, entry: FrameEntry) -> None:
        where = f"{self.name}: frame at byte {entry.file_offset}"
        if entry.image >= len(self._sizes):
            raise FormatError(f"{where} belongs to image {entry.image}, which does not exist")
        if entry.image < self._current:
            raise FormatError(f"{where} belongs to image {entry.image}, whose frames have all come")
        if entry.kind == KIND_ENVELOPE:
            if entry.image in self._envelopes:
                raise FormatError(f"image {entry.image} has more than one envelope")
        elif entry.end_offset > self._sizes[entry.image]:
            raise FormatError(f"{where} reaches past the end of its image")

    def frames(self, number: int) -> Iterator[Frame]:
        self._current = number
        while (frame := self._peek()) is not None:
            entry = frame[0]
            if entry.image > number:
                return
            self._ahead = None
            if entry.kind == KIND_ENVELOPE:
                self._envelopes[entry.image] = frame
                continue
            self._reach[number] = max(self._reach.get(number, 0), entry.end_offset)
            yield frame

    def reach(self, number: int) -> int:
        return self._reach.get(number, 0)

    def envelope(self, number: int) -> Frame | None:
        if self._envelopes.get(number) is None:
            # an envelope written after the image's items arrives before the next image's frames
            while (frame := self._peek()) is not None and frame[0].kind == KIND_ENVELOPE:
                self._ahead = None
                self._envelopes[frame[0].image] = frame
        return self._envelopes.pop(number, None)

    def finish(self) -> dict[str, Any]:
        """The whole metadata, once the end of the stream is read and checked."""
        frame = self._peek()
        if frame is not None:
            raise FormatError(f"{self.name}: frame at byte {frame[0].file_offset} comes after its image was rebuilt")
        assert self.reader.metadata is not None
        return self.reader.metadata

    def close(self) -> None:
        if self._read_ahead is not None:
            self._read_ahead.close()
        if self._closer is not None:
            with contextlib.suppress(OSError):
                self._closer.close()


def open_feed(path: Path, stream: BinaryIO | None = None) -> FileFeed | StreamFeed:
    """The feed of the overlay: ``stream`` (standard input, a socket) read as it arrives when
    given, else the overlay file at ``path`` (a regular file of either form: a FIFO or a device
    is refused at once, never waited on)."""
    if stream is not None:
        return StreamFeed(StreamReader(stream, str(path)))
    return FileFeed(OverlayReader(path))
