"""QEMU's outgoing live-migration stream, split as it arrives into verbatim bytes and RAM pages.

A relay that moves a running VM reads the stream QEMU sends (precopy, pass after pass, from a pipe
or a socket: never seekable, possibly many GB) and handles the data of each RAM page on its own:
it deduplicates the page against memory and disk the other side already holds, and sends a
reference or the page. Everything else (section headers, RAM record headers, the block table, ZERO
records, footers, the device state, the EOF byte and the VM description) goes as it is. The other
side concatenates both back into the identical stream for ``qemu-system-x86_64 -incoming``.

:func:`split_live_stream` yields :class:`Verbatim` pieces, :class:`Page` tokens (the 4 KiB data of
one PAGE record and the page's byte offset in the memory image, the image the ``qemu`` source
builds from the same stream) and a :class:`PassEnd` after each RAM section of the precopy
iteration. :func:`split_live_runs` yields :class:`PageRun` tokens in place of pages, each holding a
run of PAGE records that follow one another in the stream, which is several times faster. Either
way, :func:`stream_pieces` of the tokens, concatenated, is the input byte for byte.

The stream is read through one buffer of :data:`BUFFER_SIZE` bytes, one read call at a time
(``readinto1`` where the stream has it), and only as fast as the consumer takes tokens. Only what
the split needs is parsed: the file header, the configuration, section headers and footers and the
records of the RAM section. From the end of the RAM section on (device sections, EOF, the VM
description) everything is passed on as it comes, and checked against the VM description as the
``qemu`` source checks a file (:mod:`~vmdelta_source_qemu.vmdesc`); the last piece is held back
until that check passes, so a consumer never completes a stream that was cut or damaged there.
What a relay cannot carry is one :class:`~vmdelta_core.plugin.FormatError` naming the offset and
the capability to turn off.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import attrs
import numpy as np
from construct import Construct, ConstructError, StreamError
from numpy.lib.stride_tricks import as_strided

from vmdelta_core.plugin import FormatError
from vmdelta_source_qemu import c_migration as c
from vmdelta_source_qemu.blocks import MappedBlock, RamBlock, place_blocks
from vmdelta_source_qemu.c_migration import PAGE_SIZE, RamFlag, SectionType
from vmdelta_source_qemu.scan import REFUSED_FLAGS
from vmdelta_source_qemu.stream import (
    DEFAULT_MAX_RAM,
    MAX_BLOCKS,
    check_capabilities,
    check_page_bits,
    check_ram_claim,
    check_ram_start,
)
from vmdelta_source_qemu.vmdesc import find_description, walk_devices

__all__ = [
    "BUFFER_SIZE",
    "DEVICE_STATE_MAX",
    "LiveToken",
    "Page",
    "PageRun",
    "PassEnd",
    "RunToken",
    "Verbatim",
    "split_live_runs",
    "split_live_stream",
    "stream_pieces",
]

#: the most stream bytes held at once, besides the device state (read ahead, not yet yielded)
BUFFER_SIZE = 1 << 20
#: the most device state (everything after the RAM section) held for its check; a 128 MiB pc
#: guest has about 150 KiB, its VGA memory being a RAM block
DEVICE_STATE_MAX = 64 << 20

_PAGE_RECORD = 8 + PAGE_SIZE
_ZERO_RECORD = 8 + 1
#: the most pages in one :class:`PageRun`: whole records of a run fit the buffer
_MAX_RUN = (BUFFER_SIZE - (1 << 16)) // _PAGE_RECORD
#: the longest header, configuration or table entry parsed (a hostile length field stops here)
_HEADER_MAX = 1 << 16
#: verbatim bytes gathered before they are yielded (long stretches of ZERO records)
_VERBATIM_STEP = BUFFER_SIZE // 4
_BE64 = struct.Struct(">Q")
_EOS = int(RamFlag.EOS)
_FLUSH = int(RamFlag.MULTIFD_FLUSH)
_CONTINUE = int(RamFlag.CONTINUE)
_PAGE = int(RamFlag.PAGE)
_ZERO = int(RamFlag.ZERO)
_LOW = np.uint64(0xFFF)
_HIGH = np.uint64(0xFFFF_FFFF_FFFF_F000)
#: ``MIG_CMD_SWITCHOVER_START`` (QEMU 10 sends it before the last RAM section), the one command
#: a one-way relay carries; the others need a return path or postcopy
_SWITCHOVER_START = 11
_COMMANDS = {
    1: "opens a return path (MIG_CMD_OPEN_RETURN_PATH): turn off the return-path and postcopy-ram capabilities",
    2: "pings over a return path (MIG_CMD_PING): turn off the return-path and postcopy-ram capabilities",
    3: "advises postcopy (MIG_CMD_POSTCOPY_ADVISE): turn off the postcopy-ram capability",
    4: "starts postcopy (MIG_CMD_POSTCOPY_LISTEN): turn off the postcopy-ram capability",
    5: "starts postcopy (MIG_CMD_POSTCOPY_RUN): turn off the postcopy-ram capability",
    6: "discards postcopy pages (MIG_CMD_POSTCOPY_RAM_DISCARD): turn off the postcopy-ram capability",
    7: "packages a postcopy stream (MIG_CMD_PACKAGED): turn off the postcopy-ram capability",
    8: "enables COLO (MIG_CMD_ENABLE_COLO): turn off the x-colo capability",
    9: "resumes postcopy (MIG_CMD_POSTCOPY_RESUME): turn off the postcopy-ram capability",
    10: "requests a received-pages bitmap (MIG_CMD_RECV_BITMAP): turn off the postcopy-ram capability",
}


@attrs.frozen
class Verbatim:
    """Stream bytes to reproduce as they are."""

    data: bytes


@attrs.frozen
class Page:
    """The data of one PAGE record; ``address`` is the page's byte offset in the memory image."""

    address: int
    data: bytes


@attrs.frozen(eq=False)
class PageRun:
    """PAGE records that follow one another in the stream, all of one RAM block.

    In the stream they are ``data[0:4096]``, ``headers[0:8]``, ``data[4096:8192]``, ``headers[8:16]``,
    ...: the first record's header (and block name) comes in the verbatim piece before the run, each
    later record's 8-byte header sits between two pages. ``addresses`` (read-only, ``int64``) holds
    each page's byte offset in the memory image.
    """

    addresses: np.ndarray
    data: bytes
    headers: bytes

    def __len__(self) -> int:
        return int(self.addresses.shape[0])

    def page(self, index: int) -> Page:
        return Page(int(self.addresses[index]), self.data[index * PAGE_SIZE : (index + 1) * PAGE_SIZE])

    def raw(self) -> memoryview:
        """The run's stream bytes: its pages with the headers between them (a new buffer)."""
        n = len(self)
        records = np.empty((n, _PAGE_RECORD), np.uint8)
        records[:, 8:] = np.frombuffer(self.data, np.uint8).reshape(n, PAGE_SIZE)
        records[1:, :8] = np.frombuffer(self.headers, np.uint8).reshape(n - 1, 8)
        return memoryview(records.reshape(-1)[8:])


@attrs.frozen
class PassEnd:
    """The end of a RAM section of the precopy iteration (its EOS record and footer are in the
    verbatim bytes before): ``number`` counts them from 1, the setup section not included, so pages
    after ``PassEnd(n)`` were sent after those before it, and a later copy of a page wins."""

    number: int


LiveToken = Verbatim | Page | PassEnd
RunToken = Verbatim | PageRun | PassEnd


def split_live_stream(
    stream: BinaryIO, *, max_ram: int = DEFAULT_MAX_RAM, max_device_state: int = DEVICE_STATE_MAX
) -> Iterator[LiveToken]:
    """Split the migration stream read from ``stream`` (a blocking binary file, pipe or socket
    file) into :class:`Verbatim`, :class:`Page` and :class:`PassEnd` tokens, as it arrives.

    :param max_ram: the most RAM the block table may claim, in bytes (the ``qemu`` source's option).
    :param max_device_state: the most bytes after the RAM section held for their check.
    :raises FormatError: a stream the relay cannot carry, or a cut or damaged one, at the point the
        split finds it; tokens yielded before are the stream's bytes up to there.
    """
    for token in split_live_runs(stream, max_ram=max_ram, max_device_state=max_device_state):
        if isinstance(token, PageRun):
            yield token.page(0)
            for index in range(1, len(token)):
                yield Verbatim(token.headers[(index - 1) * 8 : index * 8])
                yield token.page(index)
        else:
            yield token


def split_live_runs(
    stream: BinaryIO, *, max_ram: int = DEFAULT_MAX_RAM, max_device_state: int = DEVICE_STATE_MAX
) -> Iterator[RunToken]:
    """:func:`split_live_stream` with the pages in :class:`PageRun` tokens (a run of one page for
    a lone record): one token, one copy of the pages and one numpy look at the headers per run."""
    return _Splitter(_Input(stream), max_ram, max_device_state).run()


def stream_pieces(tokens: Iterable[LiveToken | RunToken]) -> Iterator[bytes | memoryview]:
    """The stream bytes of ``tokens``, in order: what the receiving side writes to QEMU."""
    for token in tokens:
        if isinstance(token, Verbatim | Page):
            yield token.data
        elif isinstance(token, PageRun):
            yield token.raw()


class _Input:
    """A window on a stream that cannot seek: bytes ``start:end`` of ``buf`` are read and not yet
    taken, ``offset`` is the stream offset of ``buf[start]``."""

    def __init__(self, stream: BinaryIO) -> None:
        self._readinto = getattr(stream, "readinto1", None) or getattr(stream, "readinto", None)
        self._read = getattr(stream, "read1", None) or stream.read
        self.buf = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.array = np.frombuffer(self.buf, np.uint8)
        self.start = self.end = self.offset = 0
        self.eof = False

    @property
    def available(self) -> int:
        return self.end - self.start

    def more(self) -> bool:
        """Read once more (whatever one read gives); False at the end of the stream."""
        if self.eof:
            return False
        if self.end == len(self.buf):
            kept = self.available
            if kept == len(self.buf):
                raise AssertionError("the stream buffer is full of unread bytes")
            self.array[:kept] = self.array[self.start : self.end]
            self.start, self.end = 0, kept
        if self._readinto is not None:
            got = self._readinto(self.view[self.end :])
        else:
            chunk = self._read(len(self.buf) - self.end)
            got = len(chunk) if chunk is not None else None
            if got:
                self.view[self.end : self.end + got] = chunk
        if got is None:
            raise ValueError("the migration stream is non-blocking: give a blocking file, pipe or socket file")
        if got == 0:
            self.eof = True
            return False
        self.end += got
        return True

    def need(self, n: int) -> bool:
        """Whether ``n`` bytes are (or, after reading, become) available."""
        while self.available < n:
            if not self.more():
                return False
        return True

    def take(self, n: int) -> memoryview:
        """The next ``n`` available bytes, a view valid until the next read."""
        at = self.start
        self.start += n
        self.offset += n
        return self.view[at : at + n]


class _Splitter:
    def __init__(self, inp: _Input, max_ram: int, max_device_state: int) -> None:
        if max_ram <= 0 or max_device_state <= 0:
            raise ValueError("max_ram and max_device_state are positive numbers of bytes")
        self.inp = inp
        self.max_ram = max_ram
        self.max_device_state = max_device_state
        self.pending = bytearray()
        self.capabilities: list[str] = []
        self.blocks: list[RamBlock] = []
        self.by_name: dict[str, int] = {}
        self.current: RamBlock | None = None
        self.ram_id: int | None = None
        self.passes = 0

    # -- bytes ---------------------------------------------------------------------------------

    def keep(self, n: int) -> None:
        """Pass the next ``n`` bytes on verbatim (they must be available)."""
        self.pending += self.inp.take(n)

    def flush(self) -> Iterator[Verbatim]:
        if self.pending:
            yield Verbatim(bytes(self.pending))
            self.pending.clear()

    def byte(self, what: str) -> int:
        if not self.inp.need(1):
            raise FormatError(f"stream truncated at offset {self.inp.offset}: expected {what}")
        return self.inp.buf[self.inp.start]

    def parse(self, schema: Construct, what: str) -> Any:
        """Parse ``schema`` from the next bytes and pass them on verbatim; reads only while the
        bytes read so far end inside it (a header never waits for bytes after it)."""
        inp = self.inp
        at, window = inp.offset, 512
        inp.need(1)
        while True:
            size = min(window, inp.available, _HEADER_MAX)
            chunk = io.BytesIO(inp.view[inp.start : inp.start + size])
            try:
                value = schema.parse_stream(chunk)
            except StreamError:
                if size >= _HEADER_MAX:
                    raise FormatError(f"bad {what} at offset {at}: longer than {_HEADER_MAX} bytes") from None
                if size == window:
                    window *= 8
                elif not inp.more():
                    raise FormatError(f"stream truncated in the {what} at offset {at}") from None
                continue
            except ConstructError as exc:
                field = str(getattr(exc, "path", None) or "").split(" -> ")[-1]
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise FormatError(f"bad {what} at offset {at}: field {field or '?'}: {reason}") from None
            self.keep(chunk.tell())
            return value

    # -- the stream ----------------------------------------------------------------------------

    def run(self) -> Iterator[RunToken]:
        if not self.inp.need(4) or bytes(self.inp.view[self.inp.start : self.inp.start + 4]) != b"QEVM":
            raise FormatError("not a QEMU migration stream: no QEVM magic at offset 0")
        header = self.parse(c.FILE_HEADER, "file header")
        if header.version != c.STREAM_VERSION:
            raise FormatError(
                f"QEMU migration stream version {header.version} at offset 4; only version {c.STREAM_VERSION} "
                "is supported"
            )
        if self.byte("a section") == SectionType.CONFIGURATION:
            self.parse(c.CONFIGURATION, "configuration section")
            self.subsections()
        while True:
            kind = self.byte("a section")
            at = self.inp.offset
            if kind == SectionType.COMMAND:
                self.command()
            elif kind == SectionType.START:
                self.ram_start()
                yield from self.ram_section(counted=False)  # the setup: the block table, no page
            elif kind in (SectionType.PART, SectionType.END):
                head = self.parse(c.SECTION_PART, "section header")
                if self.ram_id is None or head.section_id != self.ram_id:
                    raise FormatError(f"section {kind} at offset {at} continues section {head.section_id}, not RAM")
                yield from self.ram_section(counted=True)
                if kind == SectionType.END:
                    break
            elif kind in (SectionType.FULL, SectionType.EOF):
                raise FormatError(
                    f"{'device section' if kind == SectionType.FULL else 'EOF byte'} at offset {at} before the RAM "
                    "section ended: not a precopy migration (turn off postcopy-ram), or a cancelled one"
                )
            else:
                raise FormatError(f"unknown section type {kind:#04x} at offset {at}")
        yield from self.device_state()

    def subsections(self) -> None:
        while self.byte("a section") == SectionType.SUBSECTION:
            at = self.inp.offset
            sub = self.parse(c.SUBSECTION_HEADER, "configuration subsection")
            if sub.name == "configuration/capabilities":
                caps = self.parse(c.CAPABILITIES, "capability list")
                if "mapped-ram" in caps:
                    raise FormatError(
                        f"stream announces mapped-ram (offset {at}): its pages go to fixed offsets of a file, "
                        "which a relay cannot carry; turn off the mapped-ram capability"
                    )
                self.capabilities = check_capabilities(caps, self.inp.offset)
            elif sub.name == "configuration/target-page-bits":
                check_page_bits(self.parse(c.Int32ub, "target page bits"), self.inp.offset - 4)
            elif sub.name == "configuration/uuid":
                if not self.inp.need(16):
                    raise FormatError(f"stream truncated in the configuration UUID at offset {self.inp.offset}")
                self.keep(16)
            else:
                raise FormatError(f"unknown configuration subsection {sub.name!r} at offset {at}")

    def command(self) -> None:
        at = self.inp.offset
        command = self.parse(c.COMMAND, "command section").command
        if command != _SWITCHOVER_START:
            what = _COMMANDS.get(command, f"sends command {command}, which a one-way relay cannot carry")
            raise FormatError(f"the COMMAND section at offset {at} {what}")

    def ram_start(self) -> None:
        """The header of RAM's START section and its block table."""
        at = self.inp.offset
        head = self.parse(c.SECTION_FULL, "section header")
        check_ram_start(head, at, self.ram_id)
        self.ram_id = head.section_id
        self.block_table()

    def block_table(self) -> None:
        at = self.inp.offset
        if not self.inp.need(8):
            raise FormatError(f"stream truncated in the RAM block table at offset {at}")
        (header,) = _BE64.unpack_from(self.inp.buf, self.inp.start)
        if header & 0xFFF != RamFlag.MEM_SIZE:
            raise FormatError(
                f"RAM section at offset {at} does not start with its block table (flags {header & 0xFFF:#x})"
            )
        total = header & ~0xFFF
        check_ram_claim(total, at, self.max_ram)
        self.keep(8)
        schema = c.block_entry(guest_address="x-ignore-shared" in self.capabilities, mapped_ram=False)
        entries: list[tuple[str, int, int | None, MappedBlock | None]] = []
        seen = 0
        while seen < total:
            if len(entries) >= MAX_BLOCKS:
                raise FormatError(f"RAM block table at offset {at} lists more than {MAX_BLOCKS} blocks")
            entry = self.parse(schema, "RAM block table")
            entries.append((entry.name, entry.used_length, entry.guest_address, None))
            seen += entry.used_length
        if seen != total:
            raise FormatError(
                f"RAM block table at offset {at} does not add up: blocks hold {seen} bytes, the header says {total} "
                "(postcopy-ram with huge pages adds page sizes: turn it off)"
            )
        self.blocks = place_blocks(entries, at)
        self.by_name = {block.name: index for index, block in enumerate(self.blocks)}

    def ram_section(self, counted: bool) -> Iterator[RunToken]:
        """The records of a RAM section through its EOS, and its footer."""
        yield from self.records()
        at = self.inp.offset
        footer = self.parse(c.FOOTER, "section footer")
        if footer.section_id != self.ram_id:
            raise FormatError(f"section footer at offset {at} names section {footer.section_id}, not {self.ram_id}")
        yield from self.flush()
        if counted:
            self.passes += 1
            yield PassEnd(self.passes)

    # -- RAM records ---------------------------------------------------------------------------

    def records(self) -> Iterator[RunToken]:
        inp = self.inp
        while True:
            at = inp.offset
            if not inp.need(8):
                raise FormatError(f"stream truncated inside a RAM section at offset {at}")
            (header,) = _BE64.unpack_from(inp.buf, inp.start)
            flags = header & 0xFFF
            for flag, what in REFUSED_FLAGS:
                if flags & flag:
                    raise FormatError(f"offset {at}: {what}")
            if flags == _EOS:
                self.keep(8)
                return
            if flags == _FLUSH:
                raise FormatError(
                    f"offset {at}: a MULTIFD_FLUSH record: the pages travel on multifd channels a relay of this "
                    "stream does not see; turn off the multifd capability"
                )
            kind = flags & ~_CONTINUE
            if kind not in (_PAGE, _ZERO):
                raise FormatError(f"offset {at}: RAM record with unknown flags {flags:#x}")
            block, head = self.block_of(header, at)
            if kind == _ZERO:
                if not inp.need(head + 1):
                    raise FormatError(f"stream truncated inside a RAM record at offset {at}")
                self.keep(head + 1)
                self.keep(_ZERO_RECORD * self.stretch(0, _ZERO_RECORD, _ZERO | _CONTINUE, block, 1 << 16))
                if len(self.pending) >= _VERBATIM_STEP:
                    yield from self.flush()
            else:
                self.keep(head)
                yield from self.flush()
                yield self.page_run(header, block, at)

    def block_of(self, header: int, at: int) -> tuple[RamBlock, int]:
        """The block a record writes to and the length of its header (with the block name)."""
        inp = self.inp
        head = 8
        if not header & _CONTINUE:
            if not inp.need(9) or not inp.need(9 + inp.buf[inp.start + 8]):
                raise FormatError(f"stream truncated inside a RAM record at offset {at}")
            length = inp.buf[inp.start + 8]
            name = bytes(inp.view[inp.start + 9 : inp.start + 9 + length]).decode("latin-1")
            if name not in self.by_name:
                raise FormatError(f"offset {at}: RAM record for block {name!r}, which is not in the block table")
            self.current = self.blocks[self.by_name[name]]
            head += 1 + length
        elif self.current is None:
            raise FormatError(f"offset {at}: RAM record continues a block, but no block was named before")
        offset = header & ~0xFFF
        if offset >= self.current.length:
            raise FormatError(
                f"offset {at}: RAM record at {offset:#x} lies beyond block {self.current.name!r} "
                f"({self.current.length:#x} bytes)"
            )
        return self.current, head

    def stretch(self, skip: int, stride: int, flags: int, block: RamBlock, limit: int) -> int:
        """How many whole records of ``stride`` bytes, from ``skip`` bytes past the read position,
        are already read and have ``flags`` and an offset inside ``block`` (at most ``limit``)."""
        inp = self.inp
        first = inp.start + skip
        n = min((inp.end - first) // stride, limit)
        if n <= 0:
            return 0
        # a cheap look at the next record before paying for numpy: live passes are sparse
        (following,) = _BE64.unpack_from(inp.buf, first)
        if following & 0xFFF != flags or following & ~0xFFF >= block.length:
            return 0
        heads = as_strided(inp.array[first:], shape=(n, 8), strides=(stride, 1)).copy().view(">u8").ravel()
        good = ((heads & _LOW) == np.uint64(flags)) & ((heads & _HIGH) < np.uint64(block.length))
        bad = np.flatnonzero(~good)
        return int(bad[0]) if bad.shape[0] else n

    def page_run(self, header: int, block: RamBlock, at: int) -> PageRun:
        """The PAGE record whose header was just passed on, and those that continue it; reads on
        while the run reaches the end of what was read."""
        inp = self.inp
        if not inp.need(PAGE_SIZE):
            raise FormatError(f"stream truncated inside a RAM record at offset {at}")
        flags = _PAGE | _CONTINUE
        count = 1 + self.stretch(PAGE_SIZE, _PAGE_RECORD, flags, block, _MAX_RUN - 1)
        while count < _MAX_RUN and self.run_goes_on(PAGE_SIZE + (count - 1) * _PAGE_RECORD, block) and inp.more():
            count = 1 + self.stretch(PAGE_SIZE, _PAGE_RECORD, flags, block, _MAX_RUN - 1)
        data = as_strided(inp.array[inp.start :], shape=(count, PAGE_SIZE), strides=(_PAGE_RECORD, 1))
        heads = as_strided(inp.array[inp.start + PAGE_SIZE :], shape=(count - 1, 8), strides=(_PAGE_RECORD, 1))
        headers = heads.tobytes()
        offsets = np.empty(count, np.int64)
        offsets[0] = header & ~0xFFF
        offsets[1:] = np.frombuffer(headers, ">u8") & _HIGH
        addresses = offsets + block.offset
        addresses.flags.writeable = False
        run = PageRun(addresses, data.tobytes(), headers)
        inp.take(PAGE_SIZE + (count - 1) * _PAGE_RECORD)
        return run

    def run_goes_on(self, next_record: int, block: RamBlock) -> bool:
        """Whether the record ``next_record`` bytes past the read position may continue a run of
        pages, but is not wholly read yet (so reading on is worth it)."""
        inp = self.inp
        if inp.available >= next_record + _PAGE_RECORD:
            return False
        if inp.available < next_record + 8:
            return True
        (header,) = _BE64.unpack_from(inp.buf, inp.start + next_record)
        return header & 0xFFF == _PAGE | _CONTINUE and header & ~0xFFF < block.length

    # -- after the RAM section -----------------------------------------------------------------

    def device_state(self) -> Iterator[RunToken]:
        """Everything after the RAM section, passed on as it is read, the last piece only once all
        of it is checked against the VM description."""
        yield from self.flush()
        inp = self.inp
        origin = inp.offset
        state = bytearray()
        held: bytes | None = None
        while inp.available or inp.more():
            piece = bytes(inp.take(inp.available))
            if len(state) + len(piece) > self.max_device_state:
                raise FormatError(
                    f"more than {self.max_device_state} bytes of device state after the RAM section (offset "
                    f"{origin}): not a stream QEMU ends, or raise max_device_state"
                )
            state += piece
            if held is not None:
                yield Verbatim(held)
            held = piece
        view = memoryview(state)
        try:
            description = find_description(view, len(state), 0)
            assert self.ram_id is not None
            walk_devices(view, 0, description, {self.ram_id})
        except FormatError as exc:
            raise FormatError(_shifted(str(exc), origin)) from None
        if held is not None:
            yield Verbatim(held)


def _shifted(message: str, origin: int) -> str:
    """A message about the device state, its offsets counted from the stream's first byte."""
    return re.sub(r"offset (\d+)", lambda m: f"offset {int(m[1]) + origin}", message)
