"""The handoff relay: a migration stream, its pages replaced by references to the bases the
receiver holds, put back together byte for byte; the stream's end withheld until proven."""

from __future__ import annotations

import io

import numpy as np
import pytest

from vmdelta_core.components import SourceImage
from vmdelta_core.errors import FormatError, IntegrityError
from vmdelta_core.handoff.relay import PAGE, HandoffBase, RelayReceiver, RelaySender
from vmdelta_core.index import BaseIndex
from vmdelta_core.overlay.schema import Ref

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
    assert stats.passes == 3 and stats.pages == {"base memory": 30, "base disk": 30, "zero": 30, "raw": 30}
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
