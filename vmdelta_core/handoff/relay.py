"""Both ends of a handoff's relay: QEMU's live migration stream in, the same stream out.

:class:`RelaySender` takes the stream as a source splits it (bytes to reproduce, pages of RAM
with their address, the end of each pass) and writes frames: each page a ``MEMORY_LIVE`` item of
the pass it came in, a reference to an identical unit of the base memory or the base disk
(looked up by hash in their indexes, confirmed byte for byte), a zero unit, or its bytes.
:class:`RelayReceiver` reads the frames, resolves every page from the bases it holds and writes
the stream as QEMU sent it, keeping back the bytes after the last page (the device state QEMU
resumes from) until the end record proves the whole stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, BinaryIO

import attrs
import numpy as np
import xxhash

from vmdelta_core.components import SourceImage
from vmdelta_core.errors import FormatError, IntegrityError
from vmdelta_core.handoff.wire import End, Run, Verbatim, pack_run, read_records, write_end, write_frame
from vmdelta_core.index import BaseIndex, unit_hashes
from vmdelta_core.overlay.items import join_addresses, split_address
from vmdelta_core.overlay.schema import ItemType, Ref

__all__ = ["HandoffBase", "RelayReceiver", "RelaySender", "RelayStatistics"]

PAGE = 4096
#: pages gathered into one frame at most; a frame also leaves after FLUSH_SECONDS
FRAME_PAGES = 2048
FLUSH_SECONDS = 0.05
#: bytes after the last page the receiver keeps back until the end is proven, at most
MAX_HELD = 256 << 20


@attrs.define(eq=False)
class HandoffBase:
    """A base both ends hold: pages found in it travel as references."""

    ref: int  # Ref.BASE_MEM or Ref.BASE_DISK
    image: SourceImage
    index: BaseIndex | None = None  # the sender's lookup; the receiver needs the image alone

    def units(self) -> np.ndarray:
        full = self.image.size // PAGE
        return self.image.data[: full * PAGE].reshape(full, PAGE)


@attrs.define
class RelayStatistics:
    """What the relay did: bytes of QEMU's stream, bytes sent, pages by how they travelled."""

    stream_bytes: int = 0
    sent_bytes: int = 0
    frames: int = 0
    passes: int = 0
    pages: dict[str, int] = attrs.field(factory=lambda: {"base memory": 0, "base disk": 0, "zero": 0, "raw": 0})
    pages_per_pass: list[int] = attrs.field(factory=list)
    sent_per_pass: list[int] = attrs.field(factory=list)

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class RelaySender:
    """Turns the tokens of a split migration stream into relay frames written to ``out``."""

    def __init__(self, out: BinaryIO, bases: list[HandoffBase], *, level: int = 3) -> None:
        self.out = out
        self.bases = sorted(bases, key=lambda b: b.ref != Ref.BASE_MEM)  # memory first
        self.level = level
        self.stats = RelayStatistics()
        self._digest = xxhash.xxh3_128()
        self._ops: list[Verbatim | tuple[list[bytes], bytes]] = []
        self._pending = bytearray()  # verbatim bytes since the last page
        self._prefixes: list[bytes] = []
        self._addresses: list[int] = []
        self._pages: list[bytes] = []
        self._pass = 0
        self._last_flush = time.monotonic()

    def relay(self, tokens: Iterable[Any]) -> RelayStatistics:
        """Send every token, then the end record; the statistics of the whole stream."""
        for token in tokens:
            self.feed(token)
        self.finish()
        return self.stats

    def feed(self, token: Any) -> None:
        """One token: ``Verbatim``-like (``data``), ``Page``-like (``address`` and ``data``) or
        ``PassEnd``-like (``number``)."""
        address = getattr(token, "address", None)
        if address is not None:
            self._page(int(address), token.data)
        elif hasattr(token, "number"):
            self._end_pass()
        else:
            data = token.data
            self._digest.update(data)
            self.stats.stream_bytes += len(data)
            self._pending += data
            if len(self._pending) >= 1 << 20:
                self._run()
                self._verbatim()
        if time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def _page(self, address: int, data: bytes) -> None:
        if len(data) != PAGE:
            raise FormatError(f"a page of {len(data)} bytes at {address:#x}; pages are {PAGE}")
        if len(self._pending) > 0xFFFF:  # a page's prefix is at most 65535 bytes
            self._run()
            self._verbatim()
        self._digest.update(data)
        self.stats.stream_bytes += len(data)
        self._prefixes.append(bytes(self._pending))
        self._pending.clear()
        self._addresses.append(address)
        self._pages.append(bytes(data))
        if len(self._pages) >= FRAME_PAGES:
            self.flush()

    def _end_pass(self) -> None:
        self.flush()
        self.stats.passes += 1
        self.stats.pages_per_pass.append(0)
        self.stats.sent_per_pass.append(0)
        self._pass = min(self._pass + 1, 0xFFFF)

    def _verbatim(self) -> None:
        if self._pending:
            self._ops.append(Verbatim(bytes(self._pending)))
            self._pending.clear()

    def _run(self) -> None:
        """The pages gathered so far, classified, as one run of items."""
        if not self._pages:
            return
        n = len(self._pages)
        pages = np.frombuffer(b"".join(self._pages), dtype=np.uint8).reshape(n, PAGE)
        refs, values = self._classify(pages)
        payloads = [page if ref == Ref.RAW else None for page, ref in zip(self._pages, refs.tolist(), strict=True)]
        items = pack_run(
            self._addresses, PAGE, refs.tolist(), values.tolist(), payloads, self._pass, ItemType.MEMORY_LIVE
        )
        self._ops.append((self._prefixes, items))
        counts = self.stats.pages
        for ref, name in ((Ref.BASE_MEM, "base memory"), (Ref.BASE_DISK, "base disk"), (Ref.ZEROS, "zero")):
            counts[name] += int(np.count_nonzero(refs == ref))
        counts["raw"] += int(np.count_nonzero(refs == Ref.RAW))
        if not self.stats.pages_per_pass:
            self.stats.pages_per_pass.append(0)
            self.stats.sent_per_pass.append(0)
        self.stats.pages_per_pass[-1] += n
        self._prefixes, self._addresses, self._pages = [], [], []

    def _classify(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refs and ref values: zero, the same unit in a base (confirmed byte for byte), or raw."""
        n = pages.shape[0]
        refs = np.full(n, int(Ref.RAW), dtype=np.int64)
        values = np.zeros(n, dtype=np.uint64)
        zero = ~pages.view(np.uint64).any(axis=1)
        refs[zero] = int(Ref.ZEROS)
        hashes = unit_hashes(pages)
        for base in self.bases:
            todo = np.flatnonzero(refs == int(Ref.RAW))
            if not todo.size or base.index is None:
                break
            found = base.index.lookup(hashes[todo])
            hit = found >= 0
            todo, found = todo[hit], found[hit]
            if not todo.size:
                continue
            same = ~(pages[todo].view(np.uint64) != base.units()[found].view(np.uint64)).any(axis=1)
            todo, found = todo[same], found[same]
            refs[todo] = int(base.ref)
            values[todo] = join_addresses(0, found.astype(np.uint64) * np.uint64(PAGE))
        return refs, values

    def flush(self) -> None:
        """Send what is gathered as one frame (at once: QEMU's completion waits for it)."""
        self._run()
        self._last_flush = time.monotonic()
        if not self._ops:
            return
        sent = write_frame(self.out, self._ops, self.level)
        self._ops = []
        self.stats.sent_bytes += sent
        self.stats.frames += 1
        if self.stats.sent_per_pass:
            self.stats.sent_per_pass[-1] += sent
        self.out.flush()

    def finish(self) -> None:
        """The bytes after the last page, then the end record."""
        self._run()
        self._verbatim()
        self.flush()
        end = End(self.stats.stream_bytes, self.stats.frames, self._digest.digest())
        self.stats.sent_bytes += write_end(self.out, end)
        self.out.flush()


class RelayReceiver:
    """Writes the stream a relay carries to ``out``, each page taken from where its item says."""

    def __init__(self, out: BinaryIO, bases: list[HandoffBase], name: str = "handoff") -> None:
        self.out = out
        self.bases = {int(b.ref): b for b in bases}
        self.name = name
        self.written = 0
        self._digest = xxhash.xxh3_128()
        self._held = bytearray()  # the bytes after the last page, until the end proves them

    def receive(self, stream: BinaryIO) -> int:
        """Read the whole relay from ``stream``; returns the length of the stream written."""
        for record in read_records(stream, self.name):
            if isinstance(record, Verbatim):
                self._hold(record.data)
            elif isinstance(record, Run):
                self._pages(record)
            else:
                self._end(record)
        return self.written

    def _hold(self, data: bytes) -> None:
        self._digest.update(data)
        self._held += data
        if len(self._held) > MAX_HELD:
            raise FormatError(f"{self.name}: more than {MAX_HELD} bytes of the stream without a page")

    def _pages(self, run: Run) -> None:
        items = run.items
        refs, values, lengths = items.refs.tolist(), items.values.tolist(), items.lengths.tolist()
        types = items.types.tolist()
        parts = [bytes(self._held)]
        self._held.clear()
        for i, prefix in enumerate(run.prefixes):
            if lengths[i] != PAGE or types[i] != ItemType.MEMORY_LIVE:
                raise FormatError(f"{self.name}: an item that is no live memory page")
            page = self._page(refs[i], values[i], items.payloads[i])
            self._digest.update(prefix)
            self._digest.update(page)
            parts += [prefix, page]
        data = b"".join(parts)
        self.out.write(data)
        self.written += len(data)

    def _page(self, ref: int, value: int, payload: Any) -> bytes | memoryview:
        if ref == Ref.RAW:
            if payload is None or len(payload) != PAGE:
                raise FormatError(f"{self.name}: a raw page that is not {PAGE} bytes")
            return payload
        if ref == Ref.ZEROS:
            return bytes(PAGE)
        base = self.bases.get(ref)
        if base is None:
            what = Ref(ref).name if ref in {int(r) for r in Ref} else f"ref {ref}"
            raise FormatError(f"{self.name}: a page refers to {what}, which this end lacks")
        number, offset = split_address(value)
        if number or offset % PAGE or offset + PAGE > base.image.size:
            raise FormatError(f"{self.name}: a page refers to {offset:#x}, outside its base")
        return memoryview(base.image.data[offset : offset + PAGE])

    def _end(self, end: End) -> None:
        length = self.written + len(self._held)
        if end.length != length or end.digest != self._digest.digest():
            raise IntegrityError(f"{self.name}: the stream put together differs from the one sent; its end is withheld")
        self.out.write(self._held)
        self.written += len(self._held)
        self._held.clear()
        self.out.flush()
