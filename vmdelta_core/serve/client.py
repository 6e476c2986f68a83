"""``vmdelta send``: stream an overlay to a ``vmdelta serve`` and return its answer.

The wire carries the stream form: a stream-form file or standard input is relayed as it is, read
in large pieces, so that its first byte leaves as soon as the command starts (no module of the
format's readers is imported for it); the server checks every frame as it arrives and withholds
the result until the whole overlay has checked. A file-form overlay is verified whole, then
converted on the way, frame by frame. Either way the bytes on the wire are those
``vmdelta convert --to stream`` would write.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, BinaryIO

from vmdelta_core.errors import ConfigError, FormatError
from vmdelta_core.overlay.layout import HEADER_SIZE, read_header
from vmdelta_core.serve.protocol import ChunkWriter, TransportError, pack_hello

__all__ = ["client_tls_context", "send_overlay"]

#: bytes read from the overlay at a time: the chunks on the wire are at most a MiB
_PIECE = 1 << 20


def client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """TLS checking the server against ``ca_file`` (a self-signed certificate will do), or the
    system's authorities."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def send_overlay(
    overlay: Path,
    host: str,
    port: int,
    *,
    token: str,
    name: str | None = None,
    stream: BinaryIO | None = None,
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Send the overlay at ``overlay`` (or read from ``stream`` in the stream form, ``overlay``
    then only naming it) and return the server's answer (``status`` ``ok``, ``target``,
    ``outputs``).

    :raises VmdeltaError: the server's error, of its kind (so the exit status is the one ``apply``
        would have had), or a :class:`TransportError` when the connection fails.
    """

    def connect() -> socket.socket:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise TransportError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            sock.sendall(pack_hello(token, name))
        except ssl.SSLError as exc:
            sock.close()
            raise TransportError(f"TLS with {host}:{port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            sock.close()
            raise TransportError(f"connection to {host}:{port} lost: {exc.strerror or exc}") from None
        return sock

    writer = ChunkWriter(connect)
    try:
        if stream is not None:
            _relay(stream, str(overlay), writer)
        else:
            _send_file(Path(overlay), writer)
        return writer.finish()
    finally:
        writer.close()


def _send_file(overlay: Path, writer: ChunkWriter) -> None:
    """The overlay file at ``overlay`` written to ``writer`` in the stream form."""
    if not overlay.is_file():
        raise ConfigError(f"{overlay} does not exist or is not a file")
    with open(overlay, "rb", buffering=0) as file:
        if read_header(file.read(HEADER_SIZE), str(overlay)):
            file.seek(0)
            _relay(file, str(overlay), writer)
            return
    from vmdelta_core.overlay.container import OverlayReader
    from vmdelta_core.overlay.convert import convert_overlay

    with OverlayReader(overlay) as source:
        convert_overlay(source, writer, stream=True)  # type: ignore[arg-type]


def _relay(stream: BinaryIO, name: str, writer: ChunkWriter) -> None:
    """A stream-form overlay copied from ``stream`` to ``writer`` as it is read; its header is
    checked first, so that a file of another kind never reaches the server."""
    head = _read_full(stream, HEADER_SIZE)
    if not read_header(head, name):
        raise FormatError(
            f"{name}: a file-form overlay, which is read from its end; a stream needs the stream form (vmdelta convert)"
        )
    writer.write(head)
    while piece := stream.read(_PIECE):
        writer.write(piece)


def _read_full(stream: BinaryIO, length: int) -> bytes:
    """``length`` bytes of ``stream``, or fewer only at its end (a pipe gives what it has)."""
    data = b""
    while len(data) < length and (piece := stream.read(length - len(data))):
        data += piece
    return data
