"""The handoff relay: a migration stream, its pages replaced by references to the bases the
receiver holds, put back together byte for byte; the stream's end withheld until proven."""

from __future__ import annotations

import io

import numpy as np
import pytest

from vmdelta_core.components import SourceImage
from vmdelta_core.errors import FormatError, IntegrityError, VmdeltaError
from vmdelta_core.handoff.relay import EARLIER_WINDOW, PAGE, EarlierPages, HandoffBase, RelayReceiver, RelaySender
from vmdelta_core.handoff.wire import End, pack_run, write_end, write_frame
from vmdelta_core.index import BaseIndex
from vmdelta_core.overlay.schema import ItemType, Ref

rng = np.random.default_rng(7)


class Tok:
    def __init__(self, data: bytes, address: int | None = None, number: int | None = None) -> None:
        self.data = data
        if address is not None:
            self.address = address
        if number is not None:
            self.number = number


def base(kind: str, pages: int) -> HandoffBase:
    data = rng.integers(0, 256, pages * PAGE, dtype=np.uint8)
    image = SourceImage(kind=kind, data=data)
    return HandoffBase(Ref.BASE_MEM if kind == "memory" else Ref.BASE_DISK, image, BaseIndex.build(image, PAGE))


@pytest.fixture(scope="module")
def bases() -> list[HandoffBase]:
    return [base("memory", 64), base("disk", 64)]


def stream_of(bases: list[HandoffBase], passes: int = 3) -> list[Tok]:
    """Tokens like a live migration's: a header, per pass record headers and pages (from either
    base, zero or new), an end of pass; device state at the end."""
    memory, disk = (b.image.data for b in bases)
    tokens = [Tok(b"QEVM\x00\x00\x00\x03" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)))]
    for number in range(passes):
        for k in range(40):
            tokens.append(Tok(int(k * PAGE | 0x28).to_bytes(8, "big")))
            choice = k % 4
            if choice == 0:
                page = memory[(k % 64) * PAGE : (k % 64 + 1) * PAGE].tobytes()
            elif choice == 1:
                page = disk[(k * 3 % 64) * PAGE : (k * 3 % 64 + 1) * PAGE].tobytes()
            elif choice == 2:
                page = bytes(PAGE)
            else:
                page = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
            tokens.append(Tok(page, address=k * PAGE))
        tokens.append(Tok(b"\x00\x00\x00\x00\x00\x00\x00\x10"))
        tokens.append(Tok(b"", number=number))
    tokens.append(Tok(b"device state " * 500 + b"\x1f"))
    return tokens


def relay(bases: list[HandoffBase], tokens: list[Tok]) -> tuple[bytes, object]:
    out = io.BytesIO()
    stats = RelaySender(out, bases).relay(tokens)
    return out.getvalue(), stats


def test_the_stream_comes_back_byte_for_byte(bases) -> None:
    tokens = stream_of(bases)
    wire, stats = relay(bases, tokens)
    out = io.BytesIO()
    written = RelayReceiver(out, [HandoffBase(b.ref, b.image) for b in bases]).receive(io.BytesIO(wire))
    expected = b"".join(t.data for t in tokens)
    assert out.getvalue() == expected and written == len(expected)
    assert stats.passes == 3 and stats.pages == {
        "base memory": 30,
        "base disk": 30,
        "earlier": 0,
        "zero": 30,
        "raw": 30,
    }
    assert len(wire) < len(expected) / 2  # refs instead of pages


def test_a_damaged_or_cut_relay_never_releases_the_end(bases) -> None:
    tokens = stream_of(bases, passes=1)
    wire, _ = relay(bases, tokens)
    tail = b"device state " * 500 + b"\x1f"
    for damaged in (wire[: len(wire) - 5], wire[:-40] + bytes([wire[-40] ^ 1]) + wire[-39:]):
        out = io.BytesIO()
        with pytest.raises((FormatError, IntegrityError)):
            RelayReceiver(out, [HandoffBase(b.ref, b.image) for b in bases]).receive(io.BytesIO(damaged))
        assert not out.getvalue().endswith(tail)


def test_a_receiver_without_the_disk_base_refuses_its_references(bases) -> None:
    wire, _ = relay(bases, stream_of(bases, passes=1))
    with pytest.raises(FormatError, match="BASE_DISK"):
        RelayReceiver(io.BytesIO(), [HandoffBase(bases[0].ref, bases[0].image)]).receive(io.BytesIO(wire))


def test_every_cut_of_a_small_relay_is_refused(bases) -> None:
    wire, _ = relay(bases, stream_of(bases, passes=1)[:12])
    for cut in range(len(wire)):
        with pytest.raises(FormatError):
            RelayReceiver(io.BytesIO(), [HandoffBase(b.ref, b.image) for b in bases]).receive(io.BytesIO(wire[:cut]))


class Disk:
    """A disk target in memory: what a receiver writes, and whether it was finished."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.finished = False

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def finish(self) -> None:
        self.finished = True


def disk_relay(bases, guest: np.ndarray, later: dict[int, bytes]) -> tuple[bytes, list[Tok], object]:
    """A relay of version 2: a pass of memory, the disk's first pass (all of ``guest``), its
    second (the blocks of ``later``), the device state."""
    out = io.BytesIO()
    sender = RelaySender(out, bases, version=2)
    tokens = stream_of(bases, passes=1)
    for token in tokens[:-1]:
        sender.feed(token)
    sender.disk_pass([(0, guest.tobytes())], 0)
    sender.disk_pass(sorted(later.items()), 1)
    sender.feed(tokens[-1])
    sender.finish()
    return out.getvalue(), tokens, sender.stats


def guest_disk(bases) -> np.ndarray:
    """32 blocks: the base disk's own, others of the base memory, zeros, new bytes."""
    memory, disk = (b.image.data for b in bases)
    blocks = [disk[: 8 * PAGE], memory[PAGE * 3 : PAGE * 11], np.zeros(8 * PAGE, np.uint8)]
    blocks.append(rng.integers(0, 256, 8 * PAGE, dtype=np.uint8))
    return np.concatenate(blocks)


def test_the_disk_comes_back_block_for_block_and_later_passes_win(bases) -> None:
    guest = guest_disk(bases)
    later = {PAGE * 20: bytes([7]) * PAGE, PAGE * 21: bytes(PAGE), PAGE * 3: guest[PAGE * 9 : PAGE * 10].tobytes()}
    wire, tokens, stats = disk_relay(bases, guest, later)
    out, disk = io.BytesIO(), Disk(64 * PAGE)
    receiver = RelayReceiver(out, [HandoffBase(b.ref, b.image) for b in bases], version=2, disk=disk)
    receiver.receive(io.BytesIO(wire))
    expected = bytearray(guest.tobytes()) + bytearray(32 * PAGE)
    for offset, block in later.items():
        expected[offset : offset + PAGE] = block
    assert disk.data == expected and disk.finished
    assert out.getvalue() == b"".join(t.data for t in tokens)
    assert [(p.blocks, p.bytes) for p in stats.disk_passes] == [(32, 32 * PAGE), (3, 3 * PAGE)]
    assert stats.disk_blocks == {"base memory": 8 + 1, "base disk": 8, "earlier": 0, "zero": 8 + 1, "raw": 8 + 1}
    assert stats.disk_passes[0].sent < 12 * PAGE  # references and zeros, not 32 blocks


def test_a_disk_damaged_or_cut_never_releases_the_end(bases) -> None:
    wire, tokens, _ = disk_relay(bases, guest_disk(bases), {0: bytes([1]) * PAGE})
    for damaged in (wire[:-30], wire[:-60] + bytes([wire[-60] ^ 1]) + wire[-59:]):
        out, disk = io.BytesIO(), Disk(64 * PAGE)
        with pytest.raises((FormatError, IntegrityError)):
            RelayReceiver(out, [HandoffBase(b.ref, b.image) for b in bases], version=2, disk=disk).receive(
                io.BytesIO(damaged)
            )
        assert not disk.finished and not out.getvalue().endswith(tokens[-1].data)


def test_disk_blocks_outside_the_disk_or_in_version_1_are_refused(bases) -> None:
    wire, _, _ = disk_relay(bases, guest_disk(bases), {})
    opened = [HandoffBase(b.ref, b.image) for b in bases]
    with pytest.raises(FormatError, match="outside the disk"):
        RelayReceiver(io.BytesIO(), opened, version=2, disk=Disk(16 * PAGE)).receive(io.BytesIO(wire))
    with pytest.raises(FormatError, match="takes no disk"):
        RelayReceiver(io.BytesIO(), opened, version=2).receive(io.BytesIO(wire))
    with pytest.raises(FormatError, match="unknown operation"):
        RelayReceiver(io.BytesIO(), opened, version=1, disk=Disk(64 * PAGE)).receive(io.BytesIO(wire))


# ------------------------------------------------------------------------------------------------
# version 3: references to pages sent earlier in the handoff
# ------------------------------------------------------------------------------------------------


def repeating_relay(bases, new: list[bytes]) -> tuple[bytes, list[Tok], object]:
    """A relay of version 3: pass 0 sends the pages ``new``, pass 1 sends them again at other
    addresses (a guest copying memory), then the disk's pass writes them as blocks (a file the
    guest wrote, its pages in the page cache)."""
    out = io.BytesIO()
    sender = RelaySender(out, bases, version=3)
    tokens = [Tok(b"QEVM\x00\x00\x00\x03")]
    for number, shift in ((0, 0), (1, 100)):
        for k, page in enumerate(new):
            tokens += [Tok(int((k + shift) * PAGE | 0x28).to_bytes(8, "big")), Tok(page, address=(k + shift) * PAGE)]
        tokens += [Tok(b"\x00" * 7 + b"\x10"), Tok(b"", number=number)]
    for token in tokens:
        sender.feed(token)
    sender.disk_pass([(0, b"".join(new))], 0)
    tokens.append(Tok(b"device state " * 100))
    sender.feed(tokens[-1])
    sender.finish()
    return out.getvalue(), tokens, sender.stats


def test_pages_sent_before_travel_as_references_to_them(bases) -> None:
    new = [rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes() for _ in range(20)]
    new[7] = new[3]  # the same page twice within one run
    wire, tokens, stats = repeating_relay(bases, new)
    out, disk = io.BytesIO(), Disk(64 * PAGE)
    receiver = RelayReceiver(out, [HandoffBase(b.ref, b.image) for b in bases], version=3, disk=disk)
    receiver.receive(io.BytesIO(wire))
    assert out.getvalue() == b"".join(t.data for t in tokens)
    assert bytes(disk.data[: 20 * PAGE]) == b"".join(new) and disk.finished
    assert stats.pages == {"base memory": 0, "base disk": 0, "earlier": 20 + 1, "zero": 0, "raw": 19}
    assert stats.disk_blocks["earlier"] == 20 and stats.disk_blocks["raw"] == 0
    assert len(wire) < 19 * PAGE + 8 * 1024  # each page's bytes once, every repeat a reference


def test_a_reference_to_a_page_not_in_the_window_is_refused(bases) -> None:
    page = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    for refs, values, payloads in (
        ([Ref.SELF], [0], [None]),  # nothing sent yet
        ([Ref.RAW, Ref.SELF], [0, 1], [page, None]),  # itself: not earlier
        ([Ref.RAW, Ref.SELF], [0, 2**63], [page, None]),
    ):
        out = io.BytesIO()
        items = pack_run([i * PAGE for i in range(len(refs))], PAGE, refs, values, payloads, 0, ItemType.MEMORY_LIVE)
        write_frame(out, [([b""] * len(refs), items)])
        write_end(out, End(0, 1, bytes(16)), 3)
        with pytest.raises(FormatError, match="refers to earlier page"):
            RelayReceiver(io.BytesIO(), [HandoffBase(b.ref, b.image) for b in bases], version=3).receive(
                io.BytesIO(out.getvalue())
            )


def test_a_receiver_of_version_2_refuses_references_to_earlier_pages(bases) -> None:
    new = [rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes() for _ in range(4)]
    wire, _, _ = repeating_relay(bases, new)
    with pytest.raises(FormatError, match="SELF"):
        RelayReceiver(
            io.BytesIO(), [HandoffBase(b.ref, b.image) for b in bases], version=2, disk=Disk(64 * PAGE)
        ).receive(io.BytesIO(wire))


def test_the_window_of_earlier_pages_forgets_the_oldest_and_stays_bounded() -> None:
    window = EarlierPages(4)
    pages = [rng.integers(0, 256, PAGE, dtype=np.uint8) for _ in range(10)]
    for k, page in enumerate(pages):
        assert window.add(page, k % 6) == k  # hashes repeat: a later page takes the number
    assert window.find(pages[9], 9 % 6) == 9 and window.find(pages[3], 3) is None
    assert window.get(6) == pages[6].tobytes()
    with pytest.raises(FormatError, match="window holds 6 to 9"):
        window.get(5)
    assert len(window._numbers) <= 4
    copy = window.get(9)
    window.add(pages[0], 0)  # overwrites page 6's slot
    assert copy == pages[9].tobytes() and EARLIER_WINDOW * PAGE <= 64 << 20


# ------------------------------------------------------------------------------------------------
# the destination's reading of a hello: which versions it takes
# ------------------------------------------------------------------------------------------------


def hello_read(handoff: object) -> tuple:
    """What a destination makes of a hello offering ``handoff`` (its bases, name, version, disk)."""
    import json
    import socket
    from types import SimpleNamespace

    from vmdelta_core.handoff.session import HandoffReceiver
    from vmdelta_core.serve.protocol import CHUNK_FIELD, MAGIC

    receiver = HandoffReceiver.__new__(HandoffReceiver)
    receiver.config = SimpleNamespace(token="t")  # type: ignore[assignment]
    body = json.dumps({"handoff": handoff, "name": "vm1", "token": "t"}).encode()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(MAGIC + CHUNK_FIELD.pack(len(body)) + body)
        return receiver._hello(theirs)


def test_a_destination_takes_versions_1_to_3_and_refuses_others() -> None:
    assert hello_read({"version": 3, "bases": []})[2:] == (3, None)
    assert hello_read({"version": 3, "bases": [], "disk": {"size": 8 * PAGE}})[2:] == (3, 8 * PAGE)
    assert hello_read({"version": 2, "bases": [], "disk": {"size": PAGE}})[2:] == (2, PAGE)
    assert hello_read({"version": 1, "bases": []})[2:] == (1, None)
    for version in (4, 0, True, 3.0, "3", None):
        with pytest.raises(VmdeltaError, match="not a handoff of version 1 to 3"):
            hello_read({"version": version, "bases": []})
    with pytest.raises(VmdeltaError, match="no size in whole blocks"):
        hello_read({"version": 3, "bases": [], "disk": {"size": 100}})
