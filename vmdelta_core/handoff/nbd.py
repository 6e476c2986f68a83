"""A small NBD client over a unix socket: what a handoff needs of QEMU's NBD servers.

A handoff reads the running guest's disk through QEMU (``nbd-server-start`` and an export of the
drive), learns which clusters the qcow2 overlay holds and which the guest dirtied from the
export's metadata contexts (``qemu:allocation-depth``, ``qemu:dirty-bitmap:NAME``), and at the
destination writes the blocks into a thin qcow2 served by ``qemu-nbd``. The protocol is the
fixed newstyle handshake with structured replies (the NBD project's ``proto.md``); only the
commands used here are spoken: READ, WRITE, WRITE_ZEROES, FLUSH, BLOCK_STATUS and DISC.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from vmdelta_core.errors import StorageError

__all__ = ["NbdClient", "NbdError"]

_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_MAGIC = 0x67446698
_STRUCTURED_MAGIC = 0x668E33EF

_FLAG_FIXED_NEWSTYLE, _FLAG_NO_ZEROES = 1, 2
_OPT_GO, _OPT_STRUCTURED_REPLY, _OPT_SET_META_CONTEXT = 7, 8, 10
_REP_ACK, _REP_INFO, _REP_META_CONTEXT = 1, 3, 4
_INFO_EXPORT = 0
_FLAG_READ_ONLY, _FLAG_SEND_WRITE_ZEROES = 1 << 1, 1 << 6
_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH, _CMD_WRITE_ZEROES, _CMD_BLOCK_STATUS = 0, 1, 2, 3, 6, 7
_REPLY_DONE = 1
_CHUNK_NONE, _CHUNK_DATA, _CHUNK_HOLE, _CHUNK_STATUS = 0, 1, 2, 5

_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")

#: a request's length at most (QEMU's server takes up to 32 MiB)
MAX_REQUEST = 8 << 20


class NbdError(StorageError):
    """The NBD server refused something, or spoke what this client does not understand."""


class NbdClient:
    """One connection to ``export`` of the NBD server at the unix socket ``path``; ``contexts``
    are the metadata contexts asked for (their ids are then in :attr:`contexts`)."""

    def __init__(self, path: Path | str, export: str, contexts: tuple[str, ...] = (), timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.contexts: dict[str, int] = {}
        self._cookie = 0
        try:
            self.sock.connect(str(path))
            self._handshake(export, contexts)
        except OSError as exc:
            self.sock.close()
            raise NbdError(f"NBD server at {path}: {exc.strerror or exc}") from None
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        """Tell the server goodbye (it flushes nothing: call :meth:`flush` first) and disconnect."""
        with contextlib.suppress(OSError):
            self.sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- handshake --------------------------------------------------------------------------------

    def _handshake(self, export: str, contexts: tuple[str, ...]) -> None:
        head = self._recv(18)
        if head[:8] != _NBDMAGIC or _U64.unpack(head[8:16])[0] != _IHAVEOPT:
            raise NbdError("not a newstyle NBD server")
        if not _U16.unpack(head[16:])[0] & _FLAG_FIXED_NEWSTYLE:
            raise NbdError("the NBD server does not speak the fixed newstyle handshake")
        self.sock.sendall(_U32.pack(_FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES))
        self._option(_OPT_STRUCTURED_REPLY, b"")
        self._expect_ack(_OPT_STRUCTURED_REPLY)
        name = export.encode()
        if contexts:
            queries = b"".join(_U32.pack(len(q.encode())) + q.encode() for q in contexts)
            self._option(_OPT_SET_META_CONTEXT, _U32.pack(len(name)) + name + _U32.pack(len(contexts)) + queries)
            for kind, data in self._replies(_OPT_SET_META_CONTEXT):
                if kind == _REP_META_CONTEXT:
                    self.contexts[data[4:].decode()] = _U32.unpack(data[:4])[0]
            missing = [q for q in contexts if q not in self.contexts]
            if missing:
                raise NbdError(f"the NBD export {export!r} offers no {', '.join(missing)}")
        self._option(_OPT_GO, _U32.pack(len(name)) + name + _U16.pack(0))
        info = None
        for kind, data in self._replies(_OPT_GO):
            if kind == _REP_INFO and len(data) >= 12 and _U16.unpack(data[:2])[0] == _INFO_EXPORT:
                info = data
        if info is None:
            raise NbdError(f"the NBD server did not describe the export {export!r}")
        self.size = _U64.unpack(info[2:10])[0]
        self.flags = _U16.unpack(info[10:12])[0]

    def _option(self, option: int, data: bytes) -> None:
        self.sock.sendall(_OPTION.pack(_IHAVEOPT, option, len(data)) + data)

    def _replies(self, option: int) -> Iterator[tuple[int, bytes]]:
        """The option's replies up to its ACK; an error reply raises."""
        while True:
            magic, opt, kind, length = _OPTION_REPLY.unpack(self._recv(_OPTION_REPLY.size))
            if magic != _REPLY_MAGIC or opt != option or length > 1 << 20:
                raise NbdError("the NBD server's answer to an option is damaged")
            data = self._recv(length)
            if kind & (1 << 31):
                text = data.decode(errors="replace") or f"error {kind & 0x7FFFFFFF:#x}"
                raise NbdError(f"the NBD server refused option {option}: {text}")
            if kind == _REP_ACK:
                return
            yield kind, data

    def _expect_ack(self, option: int) -> None:
        for _ in self._replies(option):
            pass

    # -- transmission -----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (holes come back as zeros)."""
        out = bytearray(length)
        for at in range(0, length, MAX_REQUEST):
            count = min(MAX_REQUEST, length - at)
            cookie = self._request(_CMD_READ, offset + at, count)
            for kind, payload in self._chunks(cookie):
                if kind == _CHUNK_DATA:
                    where = _U64.unpack(payload[:8])[0] - offset
                    if where < at or where + len(payload) - 8 > at + count:
                        raise NbdError("the NBD server sent data outside what was read")
                    out[where : where + len(payload) - 8] = payload[8:]
                elif kind == _CHUNK_HOLE:
                    where = _U64.unpack(payload[:8])[0] - offset
                    size = _U32.unpack(payload[8:12])[0]
                    out[where : where + size] = bytes(size)
                elif kind is None:  # a simple reply: the data follows it
                    out[at : at + count] = self._recv(count)
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        cookie = self._request(_CMD_WRITE, offset, len(data), data)
        for _ in self._chunks(cookie):
            pass

    def write_zeroes(self, offset: int, length: int) -> None:
        if not self.flags & _FLAG_SEND_WRITE_ZEROES:
            self.write(offset, bytes(length))
            return
        cookie = self._request(_CMD_WRITE_ZEROES, offset, length)
        for _ in self._chunks(cookie):
            pass

    def flush(self) -> None:
        cookie = self._request(_CMD_FLUSH, 0, 0)
        for _ in self._chunks(cookie):
            pass

    def extents(self, context: str, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, int]]:
        """``(offset, length, flags)`` of every extent of the metadata ``context`` over the range,
        in order (``qemu:allocation-depth``: the layer depth; a dirty bitmap: 1 for dirty)."""
        ident = self.contexts[context]
        end = self.size if length is None else offset + length
        while offset < end:
            count = min(end - offset, 1 << 30)
            cookie = self._request(_CMD_BLOCK_STATUS, offset, count)
            start = offset
            for kind, payload in self._chunks(cookie):
                if kind != _CHUNK_STATUS or _U32.unpack(payload[:4])[0] != ident:
                    continue
                for at in range(4, len(payload) - 7, 8):
                    size, flags = struct.unpack_from(">II", payload, at)
                    size = min(size, end - offset)
                    if size:
                        yield offset, size, flags
                    offset += size
            if offset == start:
                raise NbdError("the NBD server described no extent of what was asked")

    def _request(self, command: int, offset: int, length: int, data: bytes | memoryview = b"") -> int:
        self._cookie += 1
        self.sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, command, self._cookie, offset, length))
        if data:
            self.sock.sendall(data)
        return self._cookie

    def _chunks(self, cookie: int) -> Iterator[tuple[int | None, bytes]]:
        """The reply to request ``cookie``: its structured chunks, or ``(None, b"")`` once for a
        simple reply (the caller reads any data that follows)."""
        while True:
            magic = _U32.unpack(self._recv(4))[0]
            if magic == _SIMPLE_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(12))
                self._check(got, cookie, error, "")
                yield None, b""
                return
            if magic != _STRUCTURED_MAGIC:
                raise NbdError("the NBD server's reply is damaged")
            flags, kind, got, length = struct.unpack(">HHQI", self._recv(16))
            if length > MAX_REQUEST + 64:
                raise NbdError(f"an NBD reply chunk of {length} bytes")
            payload = self._recv(length)
            if kind & (1 << 15):
                error = _U32.unpack(payload[:4])[0]
                size = _U16.unpack(payload[4:6])[0]
                self._check(got, cookie, error or 5, payload[6 : 6 + size].decode(errors="replace"))
            elif got != cookie:
                raise NbdError("the NBD server answered a request that was not made")
            if kind != _CHUNK_NONE:
                yield kind, payload
            if flags & _REPLY_DONE:
                return

    def _check(self, got: int, cookie: int, error: int, message: str) -> None:
        if got != cookie:
            raise NbdError("the NBD server answered a request that was not made")
        if error:
            raise NbdError(f"the NBD server failed a request: {message or f'error {error}'}")

    def _recv(self, count: int) -> bytes:
        chunks, need = [], count
        while need:
            try:
                chunk = self.sock.recv(min(need, 1 << 20))
            except TimeoutError:
                raise NbdError("the NBD server did not answer in time") from None
            if not chunk:
                raise NbdError("the NBD server closed the connection")
            chunks.append(chunk)
            need -= len(chunk)
        return b"".join(chunks)
