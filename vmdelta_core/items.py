"""Fast reading and writing of many DeltaItems.

The declarative schema in :mod:`vmdelta_core.schema` is the definition; this module is the hot
path: one ``struct`` call per record, results in numpy columns, payloads as views into the frame
buffer. Its tests check it against the construct schema byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs
import numpy as np

from vmdelta_core.errors import FormatError
from vmdelta_core.schema import LIVE_TYPES, Ref

__all__ = ["ItemColumns", "pack_items", "unpack_items"]

_HEAD = struct.Struct("!QHB")
_U64 = struct.Struct("!Q")
_U16 = struct.Struct("!H")
_VALUE_REFS = frozenset(int(r) for r in (Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM))
_HASH_REF = int(Ref.SELF_HASH)
_ZERO_REF = int(Ref.ZEROS)
_LIVE = frozenset(int(t) for t in LIVE_TYPES)


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
    payloads: list[memoryview | bytes | None]
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


def unpack_items(buffer: bytes | memoryview, *, with_hash: bool = False, base_offset: int = 0) -> ItemColumns:
    """Parse every record of ``buffer``; payloads are views into it.

    :param with_hash: records end with a 32-byte digest (the "residue" variant).
    :param base_offset: where ``buffer`` starts in its file, for error messages.
    :raises FormatError: a record runs past the end of the buffer.
    """
    view = memoryview(buffer)
    end = len(view)
    offsets: list[int] = []
    lengths: list[int] = []
    refs: list[int] = []
    types: list[int] = []
    values: list[int] = []
    payloads: list[memoryview | bytes | None] = []
    seqs: list[int] = []
    hashes: list[bytes] | None = [] if with_hash else None
    unpack_head = _HEAD.unpack_from
    unpack_u64 = _U64.unpack_from
    pos = 0
    try:
        while pos < end:
            start = pos
            offset, length, info = unpack_head(view, pos)
            pos += 11
            ref = info >> 4
            typ = info & 0x0F
            value = 0
            payload: memoryview | bytes | None = None
            if ref in _VALUE_REFS:
                (value,) = unpack_u64(view, pos)
                pos += 8
            elif ref == _HASH_REF:
                payload = view[pos : pos + 32]
                pos += 32
            elif ref != _ZERO_REF:
                (size,) = unpack_u64(view, pos)
                pos += 8
                if size > end - pos:
                    raise FormatError(
                        f"item at byte {base_offset + start} claims a {size}-byte payload, "
                        f"but only {end - pos} bytes remain"
                    )
                payload = view[pos : pos + size]
                pos += size
            seq = -1
            if typ in _LIVE:
                (seq,) = _U16.unpack_from(view, pos)
                pos += 2
            if hashes is not None:
                hashes.append(bytes(view[pos : pos + 32]))
                pos += 32
            if pos > end:
                raise struct.error("short")
            offsets.append(offset)
            lengths.append(length)
            refs.append(ref)
            types.append(typ)
            values.append(value)
            payloads.append(payload)
            seqs.append(seq)
    except struct.error:
        raise FormatError(f"item at byte {base_offset + pos} is cut short") from None
    return ItemColumns(
        offsets=np.array(offsets, dtype=np.uint64),
        lengths=np.array(lengths, dtype=np.int64),
        refs=np.array(refs, dtype=np.uint8),
        types=np.array(types, dtype=np.uint8),
        values=np.array(values, dtype=np.uint64),
        payloads=payloads,
        live_seqs=np.array(seqs, dtype=np.int32),
        hashes=hashes,
    )
