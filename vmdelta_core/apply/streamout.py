"""An artifact written to a pipe while its image is rebuilt, its end withheld until all verified.

``apply - --memory BASE -`` hands QEMU the rebuilt memory stream as the overlay arrives. The
source writes it through a :class:`StreamedArtifact` (the ``ArtifactStream`` of
:mod:`vmdelta_core.components`), which lets it read each piece of the image only once the
rebuilder has made it final, and writes the artifact's last bytes only once every image is
verified, the artifact's digest checks and the other outputs are in place. On any failure the
end is never written: the consumer sees a stream that does not complete.
"""

from __future__ import annotations

import threading
from typing import BinaryIO

import numpy as np

from vmdelta_core.components import RebuiltImage, Source
from vmdelta_core.errors import IntegrityError, VmdeltaError
from vmdelta_core.overlay.digest import ImageDigest, digest_kind

__all__ = ["StreamedArtifact"]


class _Withheld(VmdeltaError):
    """Raised in the source's thread when apply failed: the artifact's end is withheld."""


class StreamedArtifact:
    """The core's side (``advance``, ``release``, ``fail``) and the source's side (``write``,
    ``wait_image``, ``finish``) of one streamed artifact, run in a thread of its own."""

    def __init__(self, out: BinaryIO, name: str, mismatch: str | None = None) -> None:
        self.out = out
        self.name = name
        #: the error when what was written is not the artifact the overlay was made from
        self.mismatch = mismatch or f"streamed {name} differs from the artifact the overlay was made from"
        self._cond = threading.Condition()
        self._final = 0
        self._failed: BaseException | None = None
        self._released = False
        self._expected: str | None = None
        self._hash = ImageDigest()  # of what is written, as create records an artifact's digest
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.size = 0

    # the core's side ---------------------------------------------------------------------------

    def start(self, source: Source, rebuilt: RebuiltImage) -> None:
        """Run ``source.stream_artifact(rebuilt, self)`` in a thread of its own."""

        def run() -> None:
            try:
                source.stream_artifact(rebuilt, self)  # type: ignore[attr-defined]
            except BaseException as exc:  # handed to the core's thread by join()
                self._error = exc
                self.fail(exc)

        self._thread = threading.Thread(target=run, name=f"vmdelta-stream-{self.name}", daemon=True)
        self._thread.start()

    def advance(self, final: int) -> None:
        """Bytes ``[0, final)`` of the image are final."""
        with self._cond:
            self._final = max(self._final, final)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._failed is None:
                self._failed = exc
            self._cond.notify_all()

    def release(self, artifact_digest: str | None) -> None:
        """Everything is verified and in place: the end may go, if the artifact's digest (when
        the overlay records one) matches what is written."""
        with self._cond:
            self._expected = artifact_digest
            self._released = True
            self._cond.notify_all()

    def join(self) -> None:
        """Wait for the source to finish; its error, if any, raised here."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None and not isinstance(self._error, _Withheld):
            raise self._error

    # the source's side -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._failed is not None:
            raise _Withheld(f"{self.name}: apply failed; the end of the stream is withheld")

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        self._check()
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        self._hash.update(view)
        self.out.write(view)
        self.size += len(view)

    def wait_image(self, end: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._final >= end or self._failed is not None)
            self._check()

    def finish(self, tail: bytes) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._released or self._failed is not None)
            self._check()
        # an overlay of the older whole-image digest: its image digest, verified, vouches instead
        if self._expected and digest_kind(self._expected) is type(self._hash):
            self._hash.update(tail)
            if self._hash.hexdigest() != self._expected:
                error = IntegrityError(self.mismatch)
                self.fail(error)
                raise error
        self.out.write(tail)
        self.out.flush()
        self.size += len(tail)
