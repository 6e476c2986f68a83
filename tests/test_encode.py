"""EncodingPolicy: which encoding each unit gets under fixed / first-smaller / best, raw as the
last resort, and an encoder whose payload does not decode to its unit stopped by name."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vmdelta_core.builtin.raw import RawEncoder
from vmdelta_core.components import Encoder
from vmdelta_core.create.encode import EncoderChoice, EncodingPolicy
from vmdelta_core.errors import PluginError
from vmdelta_core.testing import real_unit_pairs

UNIT = 4096
RAW = EncoderChoice("raw", 1, RawEncoder())


class HeadPatch(Encoder):
    """The first 64 bytes of the target and incompressible filler the decoder skips: small, but
    no smaller once compressed. Declines a unit that differs from its base past byte 64."""

    name = "head-patch"

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        filler = np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes()
        return [bytes(t[:64]) + filler if t[64:] == b[64:] else None for b, t in zip(bases, targets, strict=True)]

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        return [bytes(p[:64]) + bytes(b[64:n]) for b, p, n in zip(bases, payloads, lengths, strict=True)]


class XorHead(Encoder):
    """The XOR with the base over the first 3000 bytes: larger than HeadPatch's payload, but
    mostly zeros, so far smaller once compressed. Declines the same units as HeadPatch."""

    name = "xor-head"

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for b, t in zip(bases, targets, strict=True):
            x = np.frombuffer(b, np.uint8) ^ np.frombuffer(t, np.uint8)
            out.append(x[:3000].tobytes() if not x[3000:].any() else None)
        return out

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        out = []
        for b, p, n in zip(bases, payloads, lengths, strict=True):
            head = np.frombuffer(b, np.uint8)[: len(p)] ^ np.frombuffer(p, np.uint8)
            out.append(head.tobytes() + bytes(b[len(p) : n]))
        return out


class Bloat(Encoder):
    """A payload larger than the unit: only ``fixed`` may keep it."""

    name = "bloat"

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        return [b"\xff" * 16 + bytes(t) for t in targets]

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        return [bytes(p[16:]) for p in payloads]


class Deflate(Encoder):
    """zlib of the XOR with the base: a real delta for real pages; declines a unit it cannot shrink."""

    name = "deflate"

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for b, t in zip(bases, targets, strict=True):
            payload = zlib.compress((np.frombuffer(b, np.uint8) ^ np.frombuffer(t, np.uint8)).tobytes(), 1)
            out.append(payload if len(payload) < len(t) else None)
        return out

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        xors = [np.frombuffer(zlib.decompress(p), np.uint8) for p in payloads]
        return [
            (np.frombuffer(b, np.uint8)[:n] ^ x[:n]).tobytes() for b, x, n in zip(bases, xors, lengths, strict=True)
        ]


HEAD = EncoderChoice("head-patch", 10, HeadPatch())
XOR = EncoderChoice("xor-head", 11, XorHead())
BLOAT = EncoderChoice("bloat", 12, Bloat())


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def units(seed: int = 0, n: int = 4) -> tuple[list[memoryview], list[memoryview]]:
    """Random base units and targets edited in their first 64 bytes, except the last target,
    which is edited at its end (so HeadPatch and XorHead decline it)."""
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 256, (n, UNIT), dtype=np.uint8)
    targets = bases.copy()
    targets[:, :64] = rng.integers(0, 256, (n, 64), dtype=np.uint8)
    targets[-1, -10:] ^= 0xFF
    return [memoryview(b.tobytes()) for b in bases], [memoryview(t.tobytes()) for t in targets]


def check_decodes(choices: Sequence[EncoderChoice], bases, targets, refs: list[int], payloads: list[bytes]) -> None:
    by_ref = {c.ref: c.encoder for c in choices}
    for b, t, ref, payload in zip(bases, targets, refs, payloads, strict=True):
        assert by_ref[ref].decode([b], [memoryview(payload)], [len(t)]) == [bytes(t)]


def test_first_smaller_takes_the_first_encoder_that_shrinks_the_unit(pool: ThreadPoolExecutor) -> None:
    bases, targets = units()
    refs, payloads = EncodingPolicy([HEAD, XOR], RAW, "first-smaller", pool).encode(bases, targets)
    assert refs == [HEAD.ref] * 3 + [RAW.ref]
    assert payloads[-1] == bytes(targets[-1])
    check_decodes([HEAD, XOR, RAW], bases, targets, refs, payloads)


def test_best_judges_the_size_after_compression(pool: ThreadPoolExecutor) -> None:
    bases, targets = units()
    for order in ([HEAD, XOR], [XOR, HEAD]):
        refs, payloads = EncodingPolicy(order, RAW, "best", pool).encode(bases, targets)
        assert refs == [XOR.ref] * 3 + [RAW.ref], order
        check_decodes([HEAD, XOR, RAW], bases, targets, refs, payloads)


def test_best_keeps_raw_when_no_encoding_beats_it_compressed(pool: ThreadPoolExecutor) -> None:
    text = (b"a page of text that compresses well " * 120)[:UNIT]
    base = memoryview(bytes(64) + text[64:])
    # HeadPatch's payload is smaller than the unit, but its filler compresses worse than the unit
    assert EncodingPolicy([HEAD], RAW, "first-smaller", pool).encode([base], [memoryview(text)])[0] == [HEAD.ref]
    refs, payloads = EncodingPolicy([HEAD], RAW, "best", pool).encode([base], [memoryview(text)])
    assert (refs, payloads) == ([RAW.ref], [text])


def test_fixed_uses_the_first_encoder_even_when_it_is_larger(pool: ThreadPoolExecutor) -> None:
    bases, targets = units()
    refs, payloads = EncodingPolicy([BLOAT, HEAD], RAW, "fixed", pool).encode(bases, targets)
    assert refs == [BLOAT.ref] * 4
    assert all(len(p) == UNIT + 16 for p in payloads)
    for policy in ("first-smaller", "best"):
        refs, _ = EncodingPolicy([BLOAT], RAW, policy, pool).encode(bases, targets)
        assert refs == [RAW.ref] * 4, policy


def test_fixed_never_tries_the_second_encoder(pool: ThreadPoolExecutor) -> None:
    bases, targets = units()
    refs, payloads = EncodingPolicy([HEAD, BLOAT], RAW, "fixed", pool).encode(bases, targets)
    assert refs == [HEAD.ref] * 3 + [RAW.ref]  # declined by the first: raw, not the second
    assert payloads[-1] == bytes(targets[-1])


@pytest.mark.parametrize("policy", ["fixed", "first-smaller", "best"])
def test_units_every_encoder_declines_are_stored_raw(policy: str, pool: ThreadPoolExecutor) -> None:
    bases, targets = units(n=3)
    bases, targets = bases[-1:] * 2, targets[-1:] * 2  # only the unit edited at its end
    refs, payloads = EncodingPolicy([HEAD, XOR], RAW, policy, pool).encode(bases, targets)
    assert refs == [RAW.ref] * 2 and payloads == [bytes(t) for t in targets]


@pytest.mark.parametrize("policy", ["fixed", "first-smaller", "best"])
def test_raw_named_among_the_encoders_is_only_the_last_resort(policy: str, pool: ThreadPoolExecutor) -> None:
    bases, targets = units()
    refs, _ = EncodingPolicy([RAW, XOR], RAW, policy, pool).encode(bases, targets)
    assert refs == [XOR.ref] * 3 + [RAW.ref]


class Lossy(XorHead):
    name = "lossy"

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        return [b"\0" * n for n in lengths]


class Crashing(XorHead):
    name = "crashing"

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        raise ValueError("bad payload")


class Short(XorHead):
    name = "short"

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        return super().decode(bases, payloads, lengths)[1:]


class Shifted(XorHead):
    """Decodes the batch's bytes right, but one byte of the second unit into the first."""

    name = "shifted"

    def decode(
        self, bases: Sequence[memoryview], payloads: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes]:
        units = super().decode(bases, payloads, lengths)
        return [units[0] + units[1][:1], units[1][1:], *units[2:]]


@pytest.mark.parametrize(
    ("encoder", "message"),
    [
        (Lossy(), "encoder 'lossy' wrote a payload that does not decode to its unit (4096 bytes)"),
        (Shifted(), "encoder 'shifted' wrote a payload that does not decode to its unit (4096 bytes)"),
        (Crashing(), "encoder 'crashing' cannot decode its own payload: bad payload"),
        (Short(), "encoder 'short' decoded 2 units of 3"),
    ],
)
@pytest.mark.parametrize("policy", ["fixed", "first-smaller", "best"])
def test_an_encoder_whose_payload_does_not_decode_is_named(
    encoder: Encoder, message: str, policy: str, pool: ThreadPoolExecutor
) -> None:
    bases, targets = units()
    choice = EncoderChoice(encoder.name, 13, encoder)
    with pytest.raises(PluginError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EncodingPolicy([choice], RAW, policy, pool).encode(bases, targets)


def test_a_broken_raw_encoder_is_caught_too(pool: ThreadPoolExecutor) -> None:
    class Truncating(RawEncoder):
        def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
            return [bytes(t[:-1]) for t in targets]

    bases, targets = units(n=1)
    with pytest.raises(PluginError, match="encoder 'raw' cannot decode its own payload"):
        EncodingPolicy([], EncoderChoice("raw", 1, Truncating()), "fixed", pool).encode(bases, targets)


@pytest.fixture(scope="module")
def real_pairs() -> list[tuple[bytes, bytes]]:
    pairs = real_unit_pairs(limit=300)
    if pairs is None:
        pytest.skip("real QEMU fixtures are not available here")
    return pairs["memory"] + pairs["disk"]


@pytest.mark.parametrize("policy", ["fixed", "first-smaller", "best"])
def test_real_pages_keep_their_order_across_batches(
    policy: str, pool: ThreadPoolExecutor, real_pairs: list[tuple[bytes, bytes]]
) -> None:
    both = real_pairs  # more units than one batch of the thread pool holds
    bases = [memoryview(b) for b, _ in both]
    targets = [memoryview(t) for _, t in both]
    deflate = EncoderChoice("deflate", 14, Deflate())
    refs, payloads = EncodingPolicy([deflate], RAW, policy, pool).encode(bases, targets)
    assert len(refs) == len(payloads) == len(both)
    check_decodes([deflate, RAW], bases, targets, refs, payloads)
    assert {deflate.ref, RAW.ref} <= set(refs)  # real pages: some shrink, some do not
    if policy != "fixed":
        assert all(len(p) < UNIT for r, p in zip(refs, payloads, strict=True) if r == deflate.ref)
