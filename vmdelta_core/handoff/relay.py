"""Both ends of a handoff's relay: QEMU's live migration stream in, the same stream out.

:class:`RelaySender` takes the stream as a source splits it (bytes to reproduce, pages of RAM
with their address, the end of each pass) and writes frames: each page a ``MEMORY_LIVE`` item of
the pass it came in, a reference to an identical unit of the base memory or the base disk
(looked up by hash in their indexes, confirmed byte for byte), a zero unit, or its bytes.
:class:`RelayReceiver` reads the frames, resolves every page from the bases it holds and writes
the stream as QEMU sent it, keeping back the bytes after the last page (the device state QEMU
resumes from) until the end record proves the whole stream. With version 2 the guest's disk
travels too: blocks the sender reads through QEMU go as ``DISK_LIVE`` items classified like
pages, and the receiver writes them to a :class:`DiskTarget` that must hold them all before the
stream's end is released.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, Protocol

import attrs
import numpy as np
import xxhash

from vmdelta_core.components import SourceImage
from vmdelta_core.errors import FormatError, IntegrityError
from vmdelta_core.handoff.wire import (
    DiskRun,
    End,
    Run,
    Verbatim,
    pack_run,
    read_records,
    write_end,
    write_frame,
)
from vmdelta_core.index import BaseIndex, unit_hashes
from vmdelta_core.overlay.items import join_addresses, split_address
from vmdelta_core.overlay.schema import ItemType, Ref

__all__ = [
    "EARLIER_WINDOW",
    "DiskPass",
    "DiskTarget",
    "EarlierPages",
    "HandoffBase",
    "RelayReceiver",
    "RelaySender",
    "RelayStatistics",
]

PAGE = 4096
#: pages gathered into one frame at most; a frame also leaves after FLUSH_SECONDS
FRAME_PAGES = 2048
FLUSH_SECONDS = 0.05
#: bytes after the last page the receiver keeps back until the end is proven, at most
MAX_HELD = 256 << 20
#: raw pages both ends keep for references to earlier ones (version 3): 32 MiB each
EARLIER_WINDOW = 8192


@attrs.define(eq=False)
class HandoffBase:
    """A base both ends hold: pages found in it travel as references."""

    ref: int  # Ref.BASE_MEM or Ref.BASE_DISK
    image: SourceImage
    index: BaseIndex | None = None  # the sender's lookup; the receiver needs the image alone

    def units(self) -> np.ndarray:
        full = self.image.size // PAGE
        return self.image.data[: full * PAGE].reshape(full, PAGE)


def _by_ref() -> dict[str, int]:
    return {"base memory": 0, "base disk": 0, "earlier": 0, "zero": 0, "raw": 0}


_REF_NAMES = (
    (Ref.BASE_MEM, "base memory"),
    (Ref.BASE_DISK, "base disk"),
    (Ref.SELF, "earlier"),
    (Ref.ZEROS, "zero"),
    (Ref.RAW, "raw"),
)


class EarlierPages:
    """The last ``window`` pages a relay carried raw, numbered from 0 in the order they travel
    (memory pages and disk blocks alike). The sender finds a page here by hash and confirms it
    byte for byte; the receiver adds every raw page as it resolves it, so the two windows stay
    the same and a ``SELF`` reference names a page by its number. Memory is bounded: pages are
    held in a ring allocated once, touched only as it fills."""

    def __init__(self, window: int = EARLIER_WINDOW) -> None:
        self.window = window
        self.count = 0
        self._ring = np.empty((window, PAGE), dtype=np.uint8)
        self._hashes = np.zeros(window, dtype=np.uint64)
        self._numbers: dict[int, int] = {}  # hash -> number of the last page with it, in the window

    def add(self, page: Any, digest: int | None = None) -> int:
        """Keep ``page`` (4096 bytes) as the next number, forgetting the oldest beyond the window."""
        number, slot = self.count, self.count % self.window
        if number >= self.window:
            old = int(self._hashes[slot])
            if self._numbers.get(old) == number - self.window:
                del self._numbers[old]
        self._ring[slot] = np.frombuffer(page, dtype=np.uint8)
        if digest is not None:
            self._hashes[slot] = digest
            self._numbers[digest] = number
        self.count += 1
        return number

    def find(self, page: np.ndarray, digest: int) -> int | None:
        """The number of a page in the window equal to ``page``, or ``None``."""
        number = self._numbers.get(digest)
        if number is None or not np.array_equal(self._ring[number % self.window], page):
            return None
        return number

    def get(self, number: int) -> bytes:
        """A copy of page ``number`` (the ring moves on under a run); it must still be in the window.

        :raises FormatError: it is not.
        """
        if not self.count - self.window <= number < self.count:
            raise FormatError(f"a page refers to earlier page {number}; the window holds {self._held()}")
        return self._ring[number % self.window].tobytes()

    def _held(self) -> str:
        if not self.count:
            return "none yet"
        return f"{max(0, self.count - self.window)} to {self.count - 1}"


@attrs.define
class DiskPass:
    """One pass over the guest's disk: blocks sent, their bytes, and the bytes on the wire."""

    blocks: int = 0
    bytes: int = 0
    sent: int = 0


@attrs.define
class RelayStatistics:
    """What the relay did: bytes of QEMU's stream, bytes sent, pages by how they travelled; the
    disk's passes and its blocks by how they travelled (when the disk moves)."""

    stream_bytes: int = 0
    sent_bytes: int = 0
    frames: int = 0
    passes: int = 0
    pages: dict[str, int] = attrs.field(factory=_by_ref)
    pages_per_pass: list[int] = attrs.field(factory=list)
    sent_per_pass: list[int] = attrs.field(factory=list)
    disk_passes: list[DiskPass] = attrs.field(factory=list)
    disk_blocks: dict[str, int] = attrs.field(factory=_by_ref)

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class DiskTarget(Protocol):
    """Where a receiver writes the guest's disk blocks: :meth:`finish` makes them durable and
    checks the result, before the stream's end is released."""

    size: int

    def write(self, offset: int, data: bytes) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def finish(self) -> None: ...


class RelaySender:
    """Turns the tokens of a split migration stream into relay frames written to ``out``."""

    def __init__(self, out: BinaryIO, bases: list[HandoffBase], *, level: int = 3, version: int = 1) -> None:
        self.out = out
        self.bases = sorted(bases, key=lambda b: b.ref != Ref.BASE_MEM)  # memory first
        self.level = level
        self.version = version
        self.stats = RelayStatistics()
        self._digest = xxhash.xxh3_128()
        self._disk_digest = xxhash.xxh3_128()
        self._disk_count = 0
        self._ops: list[Verbatim | tuple[list[bytes], bytes]] = []
        self._pending = bytearray()  # verbatim bytes since the last page
        self._prefixes: list[bytes] = []
        self._addresses: list[int] = []
        self._pages: list[bytes] = []
        self._pass = 0
        self._last_flush = time.monotonic()
        self._earlier = EarlierPages() if version >= 3 else None

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
        _count(self.stats.pages, refs)
        if not self.stats.pages_per_pass:
            self.stats.pages_per_pass.append(0)
            self.stats.sent_per_pass.append(0)
        self.stats.pages_per_pass[-1] += n
        self._prefixes, self._addresses, self._pages = [], [], []

    def _classify(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refs and ref values: zero, the same unit in a base (confirmed byte for byte), a page
        sent raw earlier (version 3), or raw; each raw page joins the earlier ones."""
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
        if self._earlier is not None:
            self._against_earlier(pages, hashes, refs, values)
        return refs, values

    def _against_earlier(self, pages: np.ndarray, hashes: np.ndarray, refs: np.ndarray, values: np.ndarray) -> None:
        """Raw pages found among those sent raw before (in stream order: a page may refer to one
        earlier in the same run) become ``SELF`` references; the others join the window."""
        earlier = self._earlier
        assert earlier is not None
        for i in np.flatnonzero(refs == int(Ref.RAW)).tolist():
            digest = int(hashes[i])
            number = earlier.find(pages[i], digest)
            if number is None:
                earlier.add(pages[i], digest)
            else:
                refs[i] = int(Ref.SELF)
                values[i] = number

    def disk_pass(self, blocks: Iterable[tuple[int, bytes]], seq: int) -> DiskPass:
        """Send the guest's disk blocks ``(offset, data)`` (``data`` whole 4096-byte blocks) as
        ``DISK_LIVE`` items of pass ``seq``, in frames of their own; the pass's figures."""
        if self.version < 2:
            raise ValueError("a relay of version 1 carries no disk")
        self.flush()
        done = DiskPass()
        self.stats.disk_passes.append(done)
        for offset, data in blocks:
            for at in range(0, len(data), FRAME_PAGES * PAGE):
                piece = data[at : at + FRAME_PAGES * PAGE]
                done.sent += self._disk_frame(offset + at, piece, seq)
                done.blocks += len(piece) // PAGE
                done.bytes += len(piece)
        return done

    def _disk_frame(self, offset: int, data: bytes, seq: int) -> int:
        n = len(data) // PAGE
        if not n or len(data) != n * PAGE or offset % PAGE:
            raise ValueError(f"disk blocks at {offset:#x} are not whole {PAGE}-byte blocks")
        blocks = np.frombuffer(data, dtype=np.uint8).reshape(n, PAGE)
        refs, values = self._classify(blocks)
        offsets = list(range(offset, offset + n * PAGE, PAGE))
        for at in offsets:
            self._disk_digest.update(at.to_bytes(8, "big"))
            self._disk_digest.update(data[at - offset : at - offset + PAGE])
        self._disk_count += n
        raw = refs.tolist()
        payloads = [data[i * PAGE : (i + 1) * PAGE] if raw[i] == Ref.RAW else None for i in range(n)]
        items = pack_run(offsets, PAGE, raw, values.tolist(), payloads, seq, ItemType.DISK_LIVE)
        _count(self.stats.disk_blocks, refs)
        sent = write_frame(self.out, [items], self.level)
        self.stats.sent_bytes += sent
        self.stats.frames += 1
        self.out.flush()
        return sent

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
        end = End(
            self.stats.stream_bytes,
            self.stats.frames,
            self._digest.digest(),
            self._disk_count,
            self._disk_digest.digest(),
        )
        self.stats.sent_bytes += write_end(self.out, end, self.version)
        self.out.flush()


class RelayReceiver:
    """Writes the stream a relay carries to ``out``, each page taken from where its item says."""

    def __init__(
        self,
        out: BinaryIO,
        bases: list[HandoffBase],
        name: str = "handoff",
        *,
        version: int = 1,
        disk: DiskTarget | None = None,
        on_progress: Callable[[RelayReceiver], None] | None = None,
    ) -> None:
        self.out = out
        self.bases = {int(b.ref): b for b in bases}
        self.name = name
        self.version = version
        self.disk = disk
        self.on_progress = on_progress
        self._told = 0.0
        self.written = 0
        self.disk_blocks = 0
        self._digest = xxhash.xxh3_128()
        self._disk_digest = xxhash.xxh3_128()
        self._held = bytearray()  # the bytes after the last page, until the end proves them
        self._earlier = EarlierPages() if version >= 3 else None

    def receive(self, stream: BinaryIO) -> int:
        """Read the whole relay from ``stream``; returns the length of the stream written."""
        for record in read_records(stream, self.name, self.version):
            if isinstance(record, Verbatim):
                self._hold(record.data)
            elif isinstance(record, Run):
                self._pages(record)
            elif isinstance(record, DiskRun):
                self._blocks(record)
            else:
                self._end(record)
            if self.on_progress is not None and time.monotonic() - self._told > FLUSH_SECONDS * 10:
                self._told = time.monotonic()
                self.on_progress(self)
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

    def _blocks(self, run: DiskRun) -> None:
        """Disk blocks, each resolved like a page and written (runs of neighbours at once)."""
        if self.disk is None:
            raise FormatError(f"{self.name}: disk blocks came, and this end takes no disk")
        items = run.items
        offsets, refs, values = items.offsets.tolist(), items.refs.tolist(), items.values.tolist()
        lengths, types = items.lengths.tolist(), items.types.tolist()
        pending: list[bytes | memoryview] = []
        start = zeros = 0
        for i, offset in enumerate(offsets):
            if lengths[i] != PAGE or types[i] != ItemType.DISK_LIVE:
                raise FormatError(f"{self.name}: an item that is no live disk block")
            if offset % PAGE or offset + PAGE > self.disk.size:
                raise FormatError(f"{self.name}: a disk block at {offset:#x}, outside the disk")
            block = self._page(refs[i], values[i], items.payloads[i])
            self._disk_digest.update(offset.to_bytes(8, "big"))
            self._disk_digest.update(block)
            self.disk_blocks += 1
            is_zero = refs[i] == Ref.ZEROS
            if (pending or zeros) and (offset != start + PAGE * (len(pending) + zeros) or is_zero != bool(zeros)):
                self._write(start, pending, zeros)
                pending, zeros = [], 0
            if not pending and not zeros:
                start = offset
            if is_zero:
                zeros += 1
            else:
                pending.append(block)
        self._write(start, pending, zeros)

    def _write(self, start: int, blocks: list[bytes | memoryview], zeros: int) -> None:
        assert self.disk is not None
        if zeros:
            self.disk.write_zeroes(start, zeros * PAGE)
        elif blocks:
            self.disk.write(start, b"".join(blocks))

    def _page(self, ref: int, value: int, payload: Any) -> bytes | memoryview:
        if ref == Ref.RAW:
            if payload is None or len(payload) != PAGE:
                raise FormatError(f"{self.name}: a raw page that is not {PAGE} bytes")
            if self._earlier is not None:
                self._earlier.add(payload)
            return payload
        if ref == Ref.ZEROS:
            return bytes(PAGE)
        if ref == Ref.SELF and self._earlier is not None:
            try:
                return self._earlier.get(value)
            except FormatError as exc:
                raise FormatError(f"{self.name}: {exc}") from None
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
        disk = (self.disk_blocks, self._disk_digest.digest()) if self.version >= 2 else (0, bytes(16))
        if (end.disk_blocks, end.disk_digest) != disk:
            raise IntegrityError(f"{self.name}: the disk put together differs from the one sent; the end is withheld")
        if self.disk is not None:
            self.disk.finish()  # durable and checked before QEMU may resume from it
        self.out.write(self._held)
        self.written += len(self._held)
        self._held.clear()
        self.out.flush()


def _count(counts: dict[str, int], refs: np.ndarray) -> None:
    for ref, name in _REF_NAMES:
        counts[name] += int(np.count_nonzero(refs == ref))
