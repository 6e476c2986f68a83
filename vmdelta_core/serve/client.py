"""``vmdelta send``: stream an overlay to a ``vmdelta serve`` and return its answer.

An overlay file of either form is verified whole, then sent in the stream form (a file-form one
converted on the way, frame by frame); a stream (standard input) is sent as it arrives. Either
way the bytes on the wire are those ``vmdelta convert --to stream`` would write.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, BinaryIO

from vmdelta_core.errors import ConfigError
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.convert import convert_overlay
from vmdelta_core.overlay.stream import StreamReader
from vmdelta_core.serve.protocol import ChunkWriter, TransportError, pack_hello

__all__ = ["client_tls_context", "send_overlay"]


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

    source: OverlayReader | StreamReader
    if stream is not None:
        source = StreamReader(stream, str(overlay))
    else:
        if not Path(overlay).is_file():
            raise ConfigError(f"{overlay} does not exist or is not a file")
        source = OverlayReader(Path(overlay))
    writer = ChunkWriter(connect)
    try:
        convert_overlay(source, writer, stream=True)  # type: ignore[arg-type]
        return writer.finish()
    finally:
        writer.close()
        if isinstance(source, OverlayReader):
            source.close()
