"""Fast reading and writing of many DeltaItems.

The declarative schema in :mod:`vmdelta_core.overlay.schema` is the definition; this module is the hot
path: one walk over the records to find where each starts, then every field read column by column
with numpy, payloads as views into the frame buffer. Its tests check it against the construct schema byte for byte.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Sequence
from typing import overload

import attrs
import numpy as np

from vmdelta_core.errors import FormatError
from vmdelta_core.overlay.schema import FIXED_VALUE_REFS, LIVE_TYPES, Ref

__all__ = [
    "ADDRESS_BITS",
    "MIN_ITEM",
    "OFFSET_MASK",
    "ItemColumns",
    "ItemPayloads",
    "item_sizes",
    "join_addresses",
    "join_payloads",
    "pack_items",
    "split_address",
    "split_payloads",
    "unpack_items",
]

_HEAD = struct.Struct("!QHB")
_U64 = struct.Struct("!Q")
_U16 = struct.Struct("!H")
_VALUE_REFS = frozenset(int(r) for r in FIXED_VALUE_REFS)
_HASH_REF = int(Ref.SELF_HASH)
_ZERO_REF = int(Ref.ZEROS)
_LIVE = frozenset(int(t) for t in LIVE_TYPES)
#: bytes of the smallest item (a ZEROS record)
MIN_ITEM = 11

# A base ref's value is ``ordinal << 52 | byte offset``, the ordinal counting the bases of that
# kind in overlay order (with one disk it is the plain byte offset, as in the original item
# streams); a self ref's value is ``image number << 52 | byte offset`` of the earlier item.
ADDRESS_BITS = 52
OFFSET_MASK = (1 << ADDRESS_BITS) - 1


def split_address(value: int) -> tuple[int, int]:
    """(ordinal or image number, byte offset) of a base or self ref value."""
    return value >> ADDRESS_BITS, value & OFFSET_MASK


def join_addresses(number: int, offsets: np.ndarray) -> np.ndarray:
    """Ref values for byte ``offsets`` of base ordinal or image ``number``, as one uint64 column."""
    return (np.uint64(number) << np.uint64(ADDRESS_BITS)) | offsets.astype(np.uint64)


@attrs.define(eq=False)
class ItemColumns:
    """Items of one frame, column by column.

    ``values`` holds the u64 of base/self refs (0 otherwise); ``payloads`` holds the payload of
    payload refs and the 32-byte digest of SELF_HASH (``None`` otherwise); ``live_seqs`` is -1
    for items that are not of a live type.
    """

    offsets: np.ndarray
    lengths: np.ndarray
    refs: np.ndarray
    types: np.ndarray
    values: np.ndarray
    payloads: Sequence[memoryview | bytes | None]
    live_seqs: np.ndarray
    hashes: list[bytes] | None = None

    def __len__(self) -> int:
        return int(self.offsets.shape[0])


def pack_items(
    offsets: Sequence[int] | np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    refs: Sequence[int] | np.ndarray,
    types: Sequence[int] | np.ndarray,
    values: Sequence[int] | np.ndarray,
    payloads: Sequence[bytes | memoryview | None],
    live_seqs: Sequence[int] | np.ndarray | None = None,
) -> bytes:
    """Serialize items given as columns (see :class:`ItemColumns`) into one buffer."""
    parts: list[bytes | memoryview] = []
    append = parts.append
    head = _HEAD.pack
    u64 = _U64.pack
    offs = np.asarray(offsets, dtype=np.uint64).tolist()
    lens = np.asarray(lengths).tolist()
    rfs = np.asarray(refs).tolist()
    tps = np.asarray(types).tolist()
    vals = np.asarray(values, dtype=np.uint64).tolist()
    seqs = None if live_seqs is None else np.asarray(live_seqs).tolist()
    for i, ref in enumerate(rfs):
        typ = tps[i]
        append(head(offs[i], lens[i], (ref << 4) | typ))
        if ref in _VALUE_REFS:
            append(u64(vals[i]))
        elif ref == _HASH_REF:
            digest = payloads[i]
            if digest is None or len(digest) != 32:
                raise ValueError("a SELF_HASH item needs a 32-byte digest")
            append(digest)
        elif ref != _ZERO_REF:
            payload = payloads[i]
            assert payload is not None
            append(u64(len(payload)))
            append(payload)
        if typ in _LIVE:
            if seqs is None or seqs[i] < 0:
                raise ValueError("a live item needs a live sequence number")
            append(_U16.pack(seqs[i]))
    return b"".join(parts)


def item_sizes(refs: np.ndarray, types: np.ndarray, payloads: Sequence[bytes | memoryview | None]) -> np.ndarray:
    """The packed size of each item given as columns, without packing it (what a frame will hold)."""
    fixed, has_payload = _TABLES[False]
    info = (np.asarray(refs, dtype=np.int64) << 4) | np.asarray(types, dtype=np.int64)
    sizes = np.asarray(fixed, dtype=np.int64)[info]
    for i in np.flatnonzero(np.asarray(has_payload)[info]).tolist():
        sizes[i] += len(payloads[i])  # type: ignore[arg-type]
    return sizes


def _record_tables(with_hash: bool) -> tuple[list[int], list[bool]]:
    """Per info byte: the bytes of a record besides its payload, and whether a payload follows."""
    fixed, has_payload = [], []
    for info in range(256):
        ref, typ = info >> 4, info & 0x0F
        extra = 8 if ref in _VALUE_REFS else 32 if ref == _HASH_REF else 0 if ref == _ZERO_REF else 8
        fixed.append(11 + extra + (2 if typ in _LIVE else 0) + (32 if with_hash else 0))
        has_payload.append(ref not in _VALUE_REFS and ref not in (_HASH_REF, _ZERO_REF))
    return fixed, has_payload


_TABLES = {flag: _record_tables(flag) for flag in (False, True)}


def _record_starts(view: memoryview, with_hash: bool, base_offset: int) -> array.array[int]:
    """Where each record of ``view`` starts: the one step that must walk record by record."""
    fixed, has_payload = _TABLES[with_hash]
    end = len(view)
    starts = array.array("i" if end < 1 << 31 else "q")  # 4 bytes an item where they do
    append = starts.append
    unpack_u64 = _U64.unpack_from
    pos = 0
    while pos < end:
        append(pos)
        if end - pos < 11:
            raise FormatError(f"item at byte {base_offset + pos} is cut short")
        info = view[pos + 10]
        step = fixed[info]
        if has_payload[info]:
            if end - pos < 19:
                raise FormatError(f"item at byte {base_offset + pos} is cut short")
            (size,) = unpack_u64(view, pos + 11)
            if size > end - pos - 19:
                raise FormatError(
                    f"item at byte {base_offset + pos} claims a {size}-byte payload, "
                    f"but only {end - pos - 19} bytes remain"
                )
            step += size
        if step > end - pos:
            raise FormatError(f"item at byte {base_offset + pos} is cut short")
        pos += step
    return starts


def split_payloads(buffer: bytes | memoryview) -> bytes:
    """Items reordered for compression: every record with its payload cut out, then the payloads
    in the same order (:func:`join_payloads` undoes it). Payloads that follow each other in the
    image then follow each other in the buffer, so a compressor's matches run across them."""
    view = memoryview(buffer)
    has_payload = _TABLES[False][1]
    records: list[memoryview] = []
    payloads: list[memoryview] = []
    starts = _record_starts(view, False, 0)
    for pos, end in zip(starts, [*starts[1:], len(view)], strict=True):
        if has_payload[view[pos + 10]]:
            (size,) = _U64.unpack_from(view, pos + 11)
            records += (view[pos : pos + 19], view[pos + 19 + size : end])
            payloads.append(view[pos + 19 : pos + 19 + size])
        else:
            records.append(view[pos:end])
    return b"".join(records + payloads)


def join_payloads(buffer: bytes | memoryview) -> bytes:
    """The items :func:`split_payloads` reordered, back in their own order.

    :raises FormatError: the records do not account for exactly the buffer's bytes.
    """
    view = memoryview(buffer)
    fixed, has_payload = _TABLES[False]
    end = len(view)
    pos, payload_bytes = 0, 0
    cuts: list[tuple[int, int]] = []  # (where a payload goes, its length)
    while pos < end - payload_bytes:
        if end - payload_bytes - pos < 11:
            raise FormatError(f"split item record at byte {pos} is cut short")
        info = view[pos + 10]
        step = fixed[info]
        if has_payload[info]:
            if end - payload_bytes - pos < 19:
                raise FormatError(f"split item record at byte {pos} is cut short")
            (size,) = _U64.unpack_from(view, pos + 11)
            if size > end - payload_bytes - pos - step:
                raise FormatError(f"split item record at byte {pos} claims a {size}-byte payload the buffer lacks")
            cuts.append((pos + 19, size))
            payload_bytes += size
        if step > end - payload_bytes - pos:
            raise FormatError(f"split item record at byte {pos} is cut short")
        pos += step
    if pos != end - payload_bytes:
        raise FormatError("split items: the records overrun their payloads")
    parts: list[memoryview] = []
    at, source = 0, pos
    for split, size in cuts:
        parts += (view[at:split], view[source : source + size])
        at, source = split, source + size
    parts.append(view[at:pos])
    return b"".join(parts)


def _gather(raw: np.ndarray, at: np.ndarray, width: int, dtype: str) -> np.ndarray:
    """The ``width``-byte big-endian field at each offset ``at`` of ``raw``, as one column."""
    out = np.empty((at.shape[0], width), dtype=np.uint8)
    for k in range(width):
        out[:, k] = raw[at + k]
    return out.view(dtype).reshape(-1)


class ItemPayloads(Sequence["memoryview | None"]):
    """The payloads of a frame's items, made on demand as views into the frame buffer.

    A list of one view per item would cost ~200 bytes an item; this costs two integers.
    """

    def __init__(self, view: memoryview, starts: np.ndarray, ends: np.ndarray) -> None:
        self._view = view
        self._starts = starts  # -1: the item has no payload
        self._ends = ends

    def __len__(self) -> int:
        return int(self._starts.shape[0])

    @overload
    def __getitem__(self, index: int) -> memoryview | None: ...

    @overload
    def __getitem__(self, index: slice) -> list[memoryview | None]: ...

    def __getitem__(self, index: int | slice) -> memoryview | list[memoryview | None] | None:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start = int(self._starts[index])
        return None if start < 0 else self._view[start : int(self._ends[index])]


def unpack_items(buffer: bytes | memoryview, *, with_hash: bool = False, base_offset: int = 0) -> ItemColumns:
    """Parse every record of ``buffer``; payloads are views into it.

    Only finding where records start walks the buffer record by record; the fields are then read
    column by column with numpy, so memory stays a few times the buffer (about 40 bytes per
    item, items being at least 11 bytes) and a frame of millions of items parses in a second.

    :param with_hash: records end with a 32-byte digest (the "residue" variant).
    :param base_offset: where ``buffer`` starts in its file, for error messages.
    :raises FormatError: a record runs past the end of the buffer.
    """
    view = memoryview(buffer).cast("B")
    found = _record_starts(view, with_hash, base_offset)
    starts = np.frombuffer(found, dtype=f"i{found.itemsize}")
    raw = np.frombuffer(view, dtype=np.uint8)
    info = raw[starts + 10]
    refs = info >> 4
    types = info & 0x0F
    is_value = np.isin(refs, list(_VALUE_REFS))
    is_hash = refs == _HASH_REF
    is_payload = ~(is_value | is_hash | (refs == _ZERO_REF))
    # the u64 after the head: a value, or a payload's length (other records may end before it)
    values = np.zeros(starts.shape[0], dtype=np.uint64)
    values[is_value] = _gather(raw, starts[is_value] + 11, 8, ">u8")
    payload = np.flatnonzero(is_payload)
    sizes = _gather(raw, starts[payload] + 11, 8, ">u8").astype(starts.dtype)
    payload_starts = np.full(starts.shape[0], -1, dtype=starts.dtype)
    payload_ends = np.full(starts.shape[0], -1, dtype=starts.dtype)
    payload_starts[payload] = starts[payload] + 19
    payload_ends[payload] = starts[payload] + 19 + sizes
    payload_starts[is_hash] = starts[is_hash] + 11
    payload_ends[is_hash] = starts[is_hash] + 43
    # what follows the ref's data: the live sequence number, then the residue digest
    after = starts + 11
    after[is_value] += 8
    after[is_hash] += 32
    after[payload] += 8 + sizes
    del sizes
    live = np.flatnonzero(np.isin(types, list(_LIVE)))
    seqs = np.full(starts.shape[0], -1, dtype=np.int32)
    seqs[live] = _gather(raw, after[live], 2, ">u2")
    after[live] += 2
    hashes = [bytes(view[p : p + 32]) for p in after.tolist()] if with_hash else None
    del after
    return ItemColumns(
        offsets=_gather(raw, starts, 8, ">u8").astype(np.uint64),
        lengths=_gather(raw, starts + 8, 2, ">u2").astype(np.int64),
        refs=refs,
        types=types,
        values=values,
        payloads=ItemPayloads(view, payload_starts, payload_ends),
        live_seqs=seqs,
        hashes=hashes,
    )
