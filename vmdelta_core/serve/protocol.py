"""The transport's wire format (``schemas/transport-v1.md``): the hello, the chunked overlay,
the answer lines.

A connection carries one overlay. The client sends the magic, its hello (token and requested
name) and the overlay's prologue; the server answers one line, ``ready`` or an error, before any
frame leaves the client; then the rest of the overlay, and the server's last line says how it
went. The overlay travels in length-prefixed chunks so that its end is a chunk of length 0, not
the end of the connection: a connection that breaks off is never taken for an overlay that ended.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from vmdelta_core.errors import (
    BaseMismatchError,
    ConfigError,
    FormatError,
    IntegrityError,
    PluginError,
    StorageError,
    VmdeltaError,
)
from vmdelta_core.overlay.layout import CHECKSUM_FIELD, HEADER_SIZE, LENGTH_FIELD, MAX_METADATA

__all__ = [
    "CHUNK_FIELD",
    "DEFAULT_PORT",
    "MAGIC",
    "MAX_CHUNK",
    "MAX_HELLO",
    "MAX_LINE",
    "ChunkReader",
    "ChunkWriter",
    "TransportError",
    "answer_line",
    "error_for",
    "error_line",
    "error_of",
    "kind_of",
    "pack_hello",
    "prologue_end",
    "read_line",
    "recv_exactly",
    "unpack_hello",
]

#: the first bytes a client sends
MAGIC = b"vmdelta-transport/1\n"
DEFAULT_PORT = 7478
CHUNK_FIELD = struct.Struct(">I")
MAX_HELLO = 64 << 10
MAX_CHUNK = 1 << 20
#: a server's line: an error message can be long, an answer never is
MAX_LINE = 1 << 20

#: error kinds on the wire and the exception (so the exit status) each stands for
_KINDS: dict[str, type[VmdeltaError]] = {
    "config": ConfigError,
    "format": FormatError,
    "integrity": IntegrityError,
    "base": BaseMismatchError,
    "plugin": PluginError,
    "storage": StorageError,
    "auth": ConfigError,
    "busy": VmdeltaError,
    "internal": VmdeltaError,
}


class TransportError(VmdeltaError):
    """The connection broke, stalled or spoke something else than the transport; the overlay it
    carried is incomplete (the exit status of a malformed input)."""

    exit_code = FormatError.exit_code
    kind = "format"


def kind_of(exc: BaseException) -> str:
    """The wire kind of an error raised while serving."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str) and kind in _KINDS:
        return kind
    for name in ("base", "integrity", "format", "plugin", "config", "storage"):
        if isinstance(exc, _KINDS[name]):
            return name
    return "internal"


def error_line(kind: str, message: str) -> bytes:
    return _line({"status": "error", "error": kind, "message": message})


def error_of(kind: object, message: str) -> VmdeltaError:
    """The exception of an error's wire ``kind``."""
    cls = _KINDS.get(kind, VmdeltaError) if isinstance(kind, str) else VmdeltaError
    return cls(message)


def error_for(answer: dict[str, Any]) -> VmdeltaError:
    """The exception an error answer stands for, its message the server's."""
    return error_of(answer.get("error"), f"server: {answer.get('message', 'refused')}")


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def answer_line(data: dict[str, Any]) -> bytes:
    return _line(data)


def pack_hello(token: str, name: str | None) -> bytes:
    body = json.dumps({"name": name, "token": token}, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_HELLO:
        raise ConfigError("the token and name are too long for the transport's hello")
    return MAGIC + CHUNK_FIELD.pack(len(body)) + body


def unpack_hello(body: bytes) -> tuple[str, str | None]:
    """The token and requested name of a hello's JSON."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TransportError("the hello is not UTF-8 JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        raise TransportError("the hello is not an object with a token")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise TransportError("the hello's name is not a string")
    return data["token"], name


def recv_exactly(sock: socket.socket, count: int, what: str) -> bytes:
    """Exactly ``count`` bytes from ``sock``; a TransportError if it ends, breaks or stalls first."""
    chunks, need = [], count
    while need:
        try:
            chunk = sock.recv(min(need, MAX_CHUNK))
        except TimeoutError:
            raise TransportError(f"no data for {sock.gettimeout()} s (in {what}): connection dropped") from None
        except OSError as exc:
            raise TransportError(f"connection lost (in {what}): {exc.strerror or exc}") from None
        if not chunk:
            raise TransportError(f"connection closed (in {what})")
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def read_line(sock: socket.socket) -> dict[str, Any]:
    """One answer line from the server, as its JSON object."""
    data = bytearray()
    while not data.endswith(b"\n"):
        if len(data) >= MAX_LINE:
            raise TransportError("the server's answer is too long")
        try:
            chunk = sock.recv(1)  # one byte at a time: nothing after the line may be consumed
        except TimeoutError:
            raise TransportError(f"the server did not answer in {sock.gettimeout()} s") from None
        except OSError as exc:
            raise TransportError(f"connection lost while waiting for the answer: {exc.strerror or exc}") from None
        if not chunk:
            raise TransportError("the server closed the connection without an answer")
        data += chunk
    try:
        answer = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TransportError("the server's answer is not a JSON line (not a vmdelta server?)") from None
    if not isinstance(answer, dict) or answer.get("status") not in ("ready", "ok", "error"):
        raise TransportError("the server's answer has no status")
    return answer


class ChunkReader:
    """The overlay a connection carries, as a binary file for :class:`StreamReader`: ``read``
    gives the chunks' bytes, and ``b""`` once the chunk of length 0 came. A connection that
    breaks off or stalls raises :class:`TransportError` (so apply names it, and keeps nothing)."""

    def __init__(self, sock: socket.socket, *, record: bool = True) -> None:
        self._sock = sock
        self._buffer = memoryview(b"")
        self._record: bytearray | None = bytearray() if record else None
        self._left = 0  # bytes still to come in the current chunk
        self._ended = False
        self.received = 0  # overlay bytes taken off the connection

    def _next_chunk(self) -> None:
        (length,) = CHUNK_FIELD.unpack(recv_exactly(self._sock, CHUNK_FIELD.size, "a chunk's length"))
        if length > MAX_CHUNK:
            raise TransportError(f"a chunk of {length} bytes; at most {MAX_CHUNK}")
        self._left = length
        self._ended = length == 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("ChunkReader reads a given size only")
        if self._buffer:
            out = bytes(self._buffer[:size])
            self._buffer = self._buffer[len(out) :]
            return out
        data = self._take(size)
        if self._record is not None:
            self._record += data
        return data

    def replay(self) -> None:
        """Read again, from the start, what was read so far (the server reads the prologue
        once to find the bases, and apply reads the whole overlay); then stop recording."""
        self._buffer = memoryview(bytes(self._record or b""))
        self._record = None

    def _take(self, size: int) -> bytes:
        while not self._left and not self._ended:
            self._next_chunk()
        if self._ended or not size:
            return b""
        try:
            data = self._sock.recv(min(size, self._left))
        except TimeoutError:
            raise TransportError(f"no data for {self._sock.gettimeout()} s: connection dropped") from None
        except OSError as exc:
            raise TransportError(f"connection lost: {exc.strerror or exc}") from None
        if not data:
            raise TransportError("connection closed before the overlay's end")
        self._left -= len(data)
        self.received += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Leave the socket to whoever answers on it."""


class ChunkWriter:
    """A binary file that sends what is written to it as chunks, for :func:`convert_overlay`.

    The connection is opened (``connect``, which also sends the hello) at the first write, so a
    source verified before its first byte is written keeps no connection idle meanwhile. Once the
    prologue has gone the writer waits for the server's ``ready`` line, so no frame leaves before
    the bases are found; later an answer arriving early (the server gave up) stops it.
    """

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self._connect = connect
        self._sock: socket.socket | None = None
        self._head = bytearray()  # the overlay's bytes up to the end of its prologue
        self.sent = 0
        self.ready = False

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._connect()
        return self._sock

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        count = len(view)
        if not self.ready:
            self._head += view
            end = prologue_end(bytes(self._head[: HEADER_SIZE + 1 + LENGTH_FIELD.size]))
            if end is None or len(self._head) < end:
                return count
            self._send(memoryview(self._head)[:end])
            rest = bytes(self._head[end:])
            self._head = bytearray()
            self._await_ready()
            view = memoryview(rest)
        if view:
            self._check_answer()
            self._send(view)
        return count

    def _await_ready(self) -> None:
        answer = read_line(self.sock)
        if answer["status"] != "ready":
            raise error_for(answer)
        self.ready = True

    def _check_answer(self) -> None:
        """An answer before the end is an error: the server stopped reading."""
        sock = self.sock
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        if pending or select.select([sock], [], [], 0)[0]:
            answer = read_line(sock)
            raise error_for(answer) if answer["status"] == "error" else TransportError("unexpected answer")

    def _send(self, data: memoryview) -> None:
        sock = self.sock
        for at in range(0, len(data), MAX_CHUNK):
            piece = data[at : at + MAX_CHUNK]
            try:
                sock.sendall(CHUNK_FIELD.pack(len(piece)) + piece)
            except TimeoutError:
                raise TransportError("the server took nothing for too long") from None
            except OSError as exc:
                raise self._why(f"connection lost while sending: {exc.strerror or exc}") from None
            self.sent += len(piece)

    def _why(self, message: str) -> VmdeltaError:
        """The server's reason for a connection it broke off, when it sent one."""
        try:
            answer = read_line(self.sock)
        except TransportError:
            return TransportError(message)
        return error_for(answer) if answer["status"] == "error" else TransportError(message)

    def finish(self) -> dict[str, Any]:
        """Send the overlay's end (a chunk of length 0) and return the server's answer.

        :raises VmdeltaError: the server's error, of its kind.
        """
        if not self.ready:
            raise FormatError("the overlay ended inside its prologue" if self._head else "the overlay is empty")
        try:
            self.sock.sendall(CHUNK_FIELD.pack(0))
        except OSError as exc:
            raise self._why(f"connection lost while sending: {exc.strerror or exc}") from None
        answer = read_line(self.sock)
        if answer["status"] != "ok":
            raise error_for(answer)
        return answer

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()

    def flush(self) -> None:
        """Chunks are sent as they are written."""

    def writable(self) -> bool:
        return True


def prologue_end(head: bytes) -> int | None:
    """Where a stream-form overlay's prologue record ends, from its first 21 bytes (header, tag,
    length); ``None`` while fewer have come. Only the length is read here: the server checks
    the rest."""
    need = HEADER_SIZE + 1 + LENGTH_FIELD.size
    if len(head) < need:
        return None
    (length,) = LENGTH_FIELD.unpack(head[HEADER_SIZE + 1 : need])
    if length > MAX_METADATA:
        raise FormatError(f"overlay prologue claims {length} bytes")
    return need + length + CHECKSUM_FIELD.size
