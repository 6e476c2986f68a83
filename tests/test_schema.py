"""DeltaItem wire format: hand-built golden records, the construct schema and the fast path agree."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmdelta_core.errors import FormatError
from vmdelta_core.overlay.items import pack_items, unpack_items
from vmdelta_core.overlay.schema import DELTA_ITEM, DELTA_ITEM_WITH_HASH, ItemType, Ref

PAYLOAD_REFS = (Ref.RAW, Ref.XDELTA, Ref.BSDIFF, Ref.XOR)
VALUE_REFS = (Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM)


def by_hand(
    offset: int, length: int, ref: int, typ: int, data: object, live_seq: int | None, digest: bytes | None = None
) -> bytes:
    """The layout of the original item streams, written out with struct."""
    out = struct.pack("!QHB", offset, length, (ref << 4) | typ)
    if ref in VALUE_REFS:
        out += struct.pack("!Q", data)
    elif ref == Ref.SELF_HASH:
        out += data  # type: ignore[operator]
    elif ref != Ref.ZEROS:
        out += struct.pack("!Q", len(data)) + data  # type: ignore[arg-type]
    if typ in (ItemType.MEMORY_LIVE, ItemType.DISK_LIVE):
        out += struct.pack("!H", live_seq)
    if digest is not None:
        out += digest
    return out


def sample_data(ref: Ref) -> object:
    if ref in VALUE_REFS:
        return 0x0123_4567_89AB_C000
    if ref == Ref.SELF_HASH:
        return bytes(range(32))
    if ref == Ref.ZEROS:
        return None
    return b"payload bytes \x00\xff"


@pytest.mark.parametrize("typ", list(ItemType))
@pytest.mark.parametrize("ref", list(Ref))
def test_every_ref_and_type_parses_and_builds_to_the_same_bytes(ref: Ref, typ: ItemType) -> None:
    live = 513 if typ in (ItemType.MEMORY_LIVE, ItemType.DISK_LIVE) else None
    data = sample_data(ref)
    golden = by_hand(0x7FFF_F000, 4096, ref, typ, data, live)
    parsed = DELTA_ITEM.parse(golden)
    assert (parsed.offset, parsed.length, parsed.info.ref, parsed.info.type) == (0x7FFF_F000, 4096, ref, typ)
    assert parsed.data == data and parsed.live_seq == live
    assert DELTA_ITEM.build(parsed) == golden
    # the fast path reads and writes the same bytes
    cols = unpack_items(golden)
    assert len(cols) == 1 and int(cols.refs[0]) == ref and int(cols.types[0]) == typ
    payload = None if ref in VALUE_REFS or ref == Ref.ZEROS else data
    value = data if ref in VALUE_REFS else 0
    assert (
        pack_items([0x7FFF_F000], [4096], [ref], [typ], [value], [payload], [live if live is not None else -1])
        == golden
    )


def test_trailing_hash_variant() -> None:
    digest = bytes(range(100, 132))
    golden = by_hand(8192, 4096, Ref.RAW, ItemType.DISK, b"abc", None, digest)
    parsed = DELTA_ITEM_WITH_HASH.parse(golden)
    assert parsed.hash == digest and parsed.data == b"abc"
    assert DELTA_ITEM_WITH_HASH.build(parsed) == golden
    cols = unpack_items(golden, with_hash=True)
    assert cols.hashes == [digest]


def test_golden_item_stream_file(golden_dir) -> None:
    data = (golden_dir / "items.bin").read_bytes()
    cols = unpack_items(data)
    assert len(cols) == len(list(Ref)) * len(list(ItemType))
    rebuilt = b"".join(DELTA_ITEM.build(DELTA_ITEM.parse(data[pos:])) for pos in _record_starts(data))
    assert rebuilt == data


def _record_starts(data: bytes) -> list[int]:
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        pos += len(DELTA_ITEM.build(DELTA_ITEM.parse(data[pos:])))
    return starts


item_strategy = st.tuples(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**16 - 1),
    st.sampled_from([int(r) for r in Ref] + [0xA, 0xF]),
    st.sampled_from([int(t) for t in ItemType]),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=64),
    st.integers(0, 2**16 - 1),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(item_strategy, max_size=20))
def test_fast_path_matches_the_declarative_schema(items: list[tuple]) -> None:
    offsets, lengths, refs, types, values, payloads, seqs = [], [], [], [], [], [], []
    for offset, length, ref, typ, value, blob, seq in items:
        offsets.append(offset)
        lengths.append(length)
        refs.append(ref)
        types.append(typ)
        values.append(value if ref in VALUE_REFS else 0)
        payloads.append(
            blob.ljust(32, b"\0")[:32]
            if ref == Ref.SELF_HASH
            else None
            if ref in VALUE_REFS or ref == Ref.ZEROS
            else blob
        )
        seqs.append(seq if typ in (ItemType.MEMORY_LIVE, ItemType.DISK_LIVE) else -1)
    fast = pack_items(offsets, lengths, refs, types, values, payloads, seqs)
    slow = b"".join(
        DELTA_ITEM.build(
            {
                "offset": o,
                "length": n,
                "info": {"ref": r, "type": t},
                "data": v if r in VALUE_REFS else p,
                "live_seq": s if s >= 0 else None,
            }
        )
        for o, n, r, t, v, p, s in zip(offsets, lengths, refs, types, values, payloads, seqs, strict=True)
    )
    assert fast == slow
    cols = unpack_items(fast)
    assert cols.offsets.tolist() == offsets and cols.refs.tolist() == refs and cols.values.tolist() == values
    assert [None if p is None else bytes(p) for p in cols.payloads] == payloads


def test_cut_records_are_format_errors() -> None:
    golden = by_hand(0, 4096, Ref.RAW, ItemType.MEMORY, b"x" * 100, None)
    for cut in range(1, len(golden)):
        with pytest.raises(FormatError):
            unpack_items(golden[:cut])


def test_payload_length_beyond_the_buffer_is_refused_without_allocating() -> None:
    record = struct.pack("!QHBQ", 0, 4096, (Ref.RAW << 4) | ItemType.DISK, 2**63) + b"tiny"
    with pytest.raises(FormatError, match="claims"):
        unpack_items(record)
