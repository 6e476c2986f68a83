"""Fuzzing the overlay container: header, frames, index, trailer and the items inside frames.

Structure-aware: each example starts from a valid overlay, takes it apart into header, frames,
metadata and index, damages fields, items or bytes, and puts it back together with every offset
and checksum recomputed (or not), so that damage reaches the parsers behind the checksums. An
accepted overlay must be self-consistent: its items lie where the index says and inside their
image. See :mod:`vmdelta_core.fuzzing` for the contract and ``VMDELTA_FUZZ_SCALE`` for long runs.
"""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import construct
import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from vmdelta_core.builtin.codecs import NoneCodec, ZstdCodec
from vmdelta_core.cli import main
from vmdelta_core.components import Codec
from vmdelta_core.errors import ConfigError, FormatError, VmdeltaError
from vmdelta_core.fuzzing import check_untrusted, fuzz_settings
from vmdelta_core.overlay.container import ENTRY_SIZE, MAX_FRAME, TRAILER_SIZE, OverlayReader
from vmdelta_core.overlay.items import pack_items, unpack_items
from vmdelta_core.overlay.metadata import OverlayMetadata
from vmdelta_core.overlay.schema import DELTA_ITEM, FRAME_INDEX_ENTRY, TRAILER, ItemType, Ref

GOLDEN = Path(__file__).resolve().parent.parent / "schemas" / "golden"
CODECS: dict[str, Codec] = {"none": NoneCodec(), "zstd": ZstdCodec()}
_INDEX = struct.Struct(">QIIHBBIQQQ")
_FIELDS = ("file_offset", "stored_length", "length", "image", "kind", "codec", "item_count", "first_offset")
_FIELDS += ("end_offset", "checksum")
_WIDTHS = dict(zip(_FIELDS, (64, 32, 32, 16, 8, 8, 32, 64, 64, 64), strict=True))
_TRAILER_FIELDS = ("metadata_offset", "metadata_length", "metadata_checksum", "index_offset", "index_count")
_TRAILER_FIELDS += ("index_checksum", "file_checksum")


# ------------------------------------------------------------------------------------------------
# an overlay taken apart, and put back together


@attrs.define
class Parts:
    """An overlay as its pieces; ``entry`` and ``trailer`` override what assembling computes."""

    header: bytes
    frames: list[tuple[dict[str, int], bytes]]
    metadata: bytes
    entry: dict[tuple[int, str], int] = attrs.field(factory=dict)
    trailer: dict[str, int] = attrs.field(factory=dict)

    @classmethod
    def of(cls, data: bytes) -> Parts:
        trailer = TRAILER.parse(data[-TRAILER_SIZE:])
        frames = []
        for k in range(trailer.index_count):
            raw = FRAME_INDEX_ENTRY.parse(data[trailer.index_offset + k * ENTRY_SIZE :][:ENTRY_SIZE])
            entry = {f: int(raw[f]) if f != "kind" else int(raw.kind == "envelope") for f in _FIELDS}
            frames.append((entry, data[raw.file_offset : raw.file_offset + raw.stored_length]))
        meta = data[trailer.metadata_offset : trailer.metadata_offset + trailer.metadata_length]
        return cls(data[:16], frames, meta)

    def assemble(self) -> bytes:
        out = bytearray(self.header)
        index = []
        for k, (entry, stored) in enumerate(self.frames):
            fields = {**entry, "file_offset": len(out), "stored_length": len(stored)}
            fields["checksum"] = xxhash.xxh3_64_intdigest(stored)
            for (at, name), value in self.entry.items():
                if at == k:
                    fields[name] = value & ((1 << _WIDTHS[name]) - 1)
            index.append(_INDEX.pack(*(fields[f] for f in _FIELDS)))
            out += stored
        index_bytes = b"".join(index)
        trailer = {
            "metadata_offset": len(out),
            "metadata_length": len(self.metadata),
            "metadata_checksum": xxhash.xxh3_64_intdigest(self.metadata),
            "index_offset": len(out) + len(self.metadata),
            "index_count": len(index),
            "index_checksum": xxhash.xxh3_64_intdigest(index_bytes),
        }
        trailer.update({k: v & (2**64 - 1) for k, v in self.trailer.items() if k != "file_checksum"})
        out += self.metadata + index_bytes
        out += struct.pack(">6Q", *(trailer[f] for f in _TRAILER_FIELDS[:6]))
        checksum = self.trailer.get("file_checksum", xxhash.xxh3_64_intdigest(bytes(out)))
        return bytes(out + struct.pack(">Q", checksum & (2**64 - 1)) + b"VMDLTEND")


def _reframe(data: bytes, codec: Codec, per_frame: int, envelope: bytes) -> bytes:
    """The same overlay with its items in frames of ``per_frame`` items, live items and a
    free-id payload ref added, and an envelope frame for the last image."""
    parts = Parts.of(data)
    frames: list[tuple[dict[str, int], bytes]] = []
    for entry, stored in parts.frames:
        cols = unpack_items(codec.decompress(stored, entry["length"]))
        payloads = [None if p is None else bytes(p) for p in cols.payloads]
        seqs = cols.live_seqs.copy()
        types = cols.types.copy()
        refs = cols.refs.copy()
        types[::3] += 2  # MEMORY -> MEMORY_LIVE, DISK -> DISK_LIVE
        seqs[::3] = np.arange(seqs[::3].shape[0])
        free = np.flatnonzero(refs == Ref.RAW)[:1]
        refs[free] = 0xA
        for start in range(0, len(cols), per_frame):
            rows = slice(start, start + per_frame)
            plain = pack_items(
                cols.offsets[rows],
                cols.lengths[rows],
                refs[rows],
                types[rows],
                cols.values[rows],
                payloads[rows],
                seqs[rows],
            )
            offsets, lengths = cols.offsets[rows], cols.lengths[rows]
            fields = {
                **entry,
                "length": len(plain),
                "item_count": offsets.shape[0],
                "first_offset": int(offsets[0]),
                "end_offset": int(offsets[-1]) + int(lengths[-1]),
            }
            frames.append((fields, codec.compress(plain, 3)))
    last = max(e["image"] for e, _ in frames)
    env = {f: 0 for f in _FIELDS} | {"image": last, "kind": 1, "length": len(envelope)}
    frames.append((env, zstandard.ZstdCompressor().compress(envelope)))
    return attrs.evolve(parts, frames=frames).assemble()


def _originals() -> dict[str, Parts]:
    found = {name: Parts.of((GOLDEN / f"overlay-{name}.vmdo").read_bytes()) for name in CODECS}
    for name, codec in CODECS.items():
        data = (GOLDEN / f"overlay-{name}.vmdo").read_bytes()
        found[f"{name}-small-frames"] = Parts.of(_reframe(data, codec, 2, b"device state " * 20))
    return found


ORIGINALS = _originals()


def _codec_of(name: str) -> Codec:
    return CODECS[name.split("-")[0]]


# ------------------------------------------------------------------------------------------------
# reading an overlay the way apply and inspect do, and what an accepted one must satisfy


def _read(path: Path, codecs: dict[int, Codec]) -> tuple[Any, list[tuple[Any, Any]]]:
    with OverlayReader(path) as reader:
        reader.verify()
        meta = OverlayMetadata.from_json(reader.metadata, reader.frames)
        frames = []
        for entry in reader.frames:
            if entry.kind == "items" and entry.codec in codecs:
                frames.append((entry, reader.items(entry, codecs[entry.codec])))
        return meta, frames


def _bound(size: int, parts: Parts) -> int:
    """The design's memory bound for opening and reading an overlay of ``size`` bytes: the
    metadata as Python objects (at most 32 bytes an input byte) and the index, both proportional
    to the file; then one frame at a time, its decompressed bytes and their columns (at most six
    times the length the index gives, which is at most MAX_FRAME)."""
    lengths = [e["length"] for e, _ in parts.frames] + [v for (_, f), v in parts.entry.items() if f == "length"]
    return (1 << 20) + 40 * size + 6 * min(max(lengths, default=0), MAX_FRAME)


def _check_accepted(meta: Any, frames: list[tuple[Any, Any]]) -> None:
    for entry, cols in frames:
        assert len(cols) == entry.item_count
        ends = cols.offsets + cols.lengths.astype(np.uint64)
        assert int(cols.offsets[0]) == entry.first_offset and int(ends[-1]) == entry.end_offset
        assert (cols.offsets >= entry.first_offset).all() and (ends <= entry.end_offset).all()
        assert (ends <= meta.images[entry.image].size).all(), "an accepted item lies outside its image"
        for k, payload in enumerate(cols.payloads):
            ref = int(cols.refs[k])
            if ref in (Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM, Ref.ZEROS):
                assert payload is None
            else:
                assert payload is not None and (ref != Ref.SELF_HASH or len(payload) == 32)


def _run(folder: Path, data: bytes, codec: Codec, parts: Parts) -> None:
    path = folder / "fuzzed.vmdo"
    path.write_bytes(data)
    result = check_untrusted("overlay container", lambda: _read(path, {0: codec}), memory=_bound(len(data), parts))
    if isinstance(result, VmdeltaError):
        assert "\n" not in str(result)
    else:
        _check_accepted(*result)


# ------------------------------------------------------------------------------------------------
# mutations

INTERESTING = (0, 1, 2, 7, 11, 16, 47, 48, 64, 255, 4096, 65535, 2**31, 2**32 - 1, 2**52, 2**63, 2**64 - 1)


def _value(draw: Any, old: int) -> int:
    return draw(
        st.one_of(
            st.sampled_from(INTERESTING),
            st.integers(-64, 64).map(lambda d: max(0, old + d)),
            st.just(old ^ (1 << draw(st.integers(0, 63)))),
            st.integers(0, 2**64 - 1),
        )
    )


def _bytes_mutation(draw: Any, data: bytes, start: int = 0) -> bytes:
    """One of: flip bits, set a byte, cut, delete a run, insert bytes, duplicate a run."""
    data = bytearray(data)
    if not data:
        return bytes(draw(st.binary(max_size=32)))
    at = draw(st.integers(start, max(start, len(data) - 1)))
    op = draw(st.sampled_from(["flip", "set", "cut", "delete", "insert", "duplicate"]))
    if op == "flip":
        data[at % len(data)] ^= draw(st.integers(1, 255))
    elif op == "set":
        data[at % len(data)] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
    elif op == "cut":
        del data[at:]
    elif op == "delete":
        del data[at : at + draw(st.integers(1, 64))]
    elif op == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    else:
        n = draw(st.integers(1, 64))
        data[at:at] = data[at : at + n]
    return bytes(data)


def _record_starts(plain: bytes) -> list[int]:
    """Where each item starts by the declarative schema, up to the first that does not parse."""
    starts, pos = [], 0
    while pos < len(plain):
        try:
            size = len(DELTA_ITEM.build(DELTA_ITEM.parse(plain[pos:])))
        except (construct.ConstructError, ValueError):
            break
        starts.append(pos)
        pos += size
    return starts


def _item_mutation(draw: Any, plain: bytes) -> bytes:
    """Damage one item field (offset, length, info, the u64 after the head) or the bytes."""
    starts = _record_starts(plain)
    if not starts or draw(st.booleans()):
        return _bytes_mutation(draw, plain)
    at = draw(st.sampled_from(starts))
    field = draw(st.sampled_from([(0, 8), (8, 2), (10, 1), (11, 8)]))
    pos, width = at + field[0], field[1]
    old = int.from_bytes(plain[pos : pos + width], "big")
    if field == (10, 1):
        new = draw(st.integers(0, 15)) << 4 | draw(st.integers(0, 15)) if draw(st.booleans()) else old ^ 0x20
    else:
        new = _value(draw, old) & ((1 << 8 * width) - 1)
    return plain[:pos] + new.to_bytes(width, "big") + plain[pos + width :]


def _metadata_mutation(draw: Any, meta: bytes) -> bytes:
    """JSON the container's reader must refuse or hand on (its fields are metadata.py's)."""
    return draw(
        st.sampled_from(
            [
                b"[" * 100_000 + b"]" * 100_000,
                b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                b'{"format":' + b"9" * 5000 + b"}",
                b"[]",
                b"null",
                b"\xff\xfe{}",
                meta[: len(meta) // 2],
                meta.replace(b'"unit_size":4096', b'"unit_size":NaN'),
                meta.replace(b'"size":', b'"size":1e400,"x":', 1),
            ]
        )
    )


@st.composite
def damaged_overlays(draw: Any) -> tuple[str, bytes, Parts]:
    name = draw(st.sampled_from(sorted(ORIGINALS)))
    original = ORIGINALS[name]
    codec = _codec_of(name)
    parts = Parts(original.header, list(original.frames), original.metadata)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["entry", "trailer", "items", "frames", "metadata", "header", "stored"]))
        if kind == "entry" and parts.frames:
            k = draw(st.integers(0, len(parts.frames) - 1))
            field = draw(st.sampled_from(_FIELDS))
            old = parts.frames[k][0].get(field, 0)
            parts.entry[k, field] = _value(draw, old) if field != "kind" else draw(st.integers(0, 255))
        elif kind == "trailer":
            field = draw(st.sampled_from(_TRAILER_FIELDS))
            parts.trailer[field] = _value(draw, 0)
        elif kind == "items" and parts.frames:
            k = draw(st.integers(0, len(parts.frames) - 1))
            entry, stored = parts.frames[k]
            try:
                plain = codec.decompress(stored, entry["length"])
            except FormatError:  # an envelope, or a frame damaged by an earlier mutation
                continue
            plain = _item_mutation(draw, plain)
            keep_index = draw(st.booleans())  # else the index is updated to agree with the items
            fields = dict(entry, length=len(plain))
            if not keep_index:
                try:
                    cols = unpack_items(plain)
                    if len(cols):
                        fields["item_count"] = len(cols)
                        fields["first_offset"] = int(cols.offsets[0])
                        fields["end_offset"] = (int(cols.offsets[-1]) + int(cols.lengths[-1])) % 2**64
                except FormatError:
                    pass
            parts.frames[k] = (fields, codec.compress(plain, 3))
        elif kind == "frames" and parts.frames:
            k = draw(st.integers(0, len(parts.frames) - 1))
            op = draw(st.sampled_from(["drop", "duplicate", "swap"]))
            if op == "drop":
                del parts.frames[k]
            elif op == "duplicate":
                parts.frames.insert(k, parts.frames[k])
            else:
                j = draw(st.integers(0, len(parts.frames) - 1))
                parts.frames[k], parts.frames[j] = parts.frames[j], parts.frames[k]
        elif kind == "metadata":
            parts.metadata = _metadata_mutation(draw, parts.metadata)
        elif kind == "header":
            parts.header = _bytes_mutation(draw, parts.header)
        elif kind == "stored" and parts.frames:
            k = draw(st.integers(0, len(parts.frames) - 1))
            entry, stored = parts.frames[k]
            parts.frames[k] = (entry, _bytes_mutation(draw, stored))
    data = parts.assemble()
    if draw(st.integers(0, 4)) == 0:  # damage after sealing: only the checksums stand in the way
        data = _bytes_mutation(draw, data)
    return name, data, parts


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-container")


@fuzz_settings(150)
@given(case=damaged_overlays())
def test_fuzz_overlay_container(folder: Path, case: tuple[str, bytes, Parts]) -> None:
    name, data, parts = case
    _run(folder, data, _codec_of(name), parts)


@st.composite
def damaged_item_streams(draw: Any) -> bytes:
    name = draw(st.sampled_from(sorted(ORIGINALS)))
    parts = ORIGINALS[name]
    entry, stored = draw(st.sampled_from([f for f in parts.frames if f[0]["kind"] == 0]))
    plain = _codec_of(name).decompress(stored, entry["length"])
    if draw(st.integers(0, 3)) == 0:
        plain = (GOLDEN / "items.bin").read_bytes()
    for _ in range(draw(st.integers(1, 4))):
        plain = _item_mutation(draw, plain)
    return plain


def _schema_items(plain: bytes) -> list[tuple[int, int, int, int, Any, int]]:
    """The declarative schema's reading of an item stream (the oracle for the fast path)."""
    out, pos = [], 0
    while pos < len(plain):
        item = DELTA_ITEM.parse(plain[pos:])
        pos += len(DELTA_ITEM.build(item))
        out.append((item.offset, item.length, item.info.ref, item.info.type, item.data, item.live_seq))
    return out


@fuzz_settings(300)
@given(damaged_item_streams())
def test_fuzz_item_stream_agrees_with_the_schema(plain: bytes) -> None:
    """The fast path refuses exactly what the declarative schema cannot parse, and reads the rest
    field for field the same way."""
    result = check_untrusted("overlay items", lambda: unpack_items(plain), memory=(1 << 20) + 6 * len(plain))
    try:
        expected = _schema_items(plain)
    except (construct.ConstructError, ValueError):  # a payload length past the end overflows in construct
        expected = None
    if isinstance(result, VmdeltaError):
        assert expected is None, f"the fast path refused what the schema reads: {result}"
        return
    assert expected is not None, "the fast path accepted what the schema cannot parse"
    assert len(result) == len(expected)
    for k, (offset, length, ref, typ, data, seq) in enumerate(expected):
        assert (int(result.offsets[k]), int(result.lengths[k])) == (offset, length)
        assert (int(result.refs[k]), int(result.types[k])) == (ref, typ)
        assert int(result.live_seqs[k]) == (-1 if seq is None else seq)
        if isinstance(data, int):
            assert int(result.values[k]) == data and result.payloads[k] is None
        elif data is None:
            assert result.payloads[k] is None
        else:
            assert bytes(result.payloads[k]) == data


# ------------------------------------------------------------------------------------------------
# what the fuzzers found, one regression test each


def _write(tmp_path: Path, parts: Parts) -> Path:
    path = tmp_path / "case.vmdo"
    path.write_bytes(parts.assemble())
    return path


def _copy(name: str) -> Parts:
    p = ORIGINALS[name]
    return Parts(p.header, list(p.frames), p.metadata)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),  # was a RecursionError
        (b'{"format":' + b"9" * 5000 + b"}", "not usable JSON"),  # was a ValueError (int digits)
    ],
)
def test_metadata_json_that_python_cannot_hold_is_a_format_error(tmp_path: Path, metadata: bytes, message: str) -> None:
    parts = _copy("none")
    parts.metadata = metadata
    with pytest.raises(FormatError, match=message):
        OverlayReader(_write(tmp_path, parts)).close()


def test_unknown_frame_kind_is_refused(tmp_path: Path) -> None:
    """Was accepted, and the frame silently ignored by apply."""
    parts = _copy("none")
    parts.entry[0, "kind"] = 7
    with pytest.raises(FormatError, match=r"frame index entry 0 \(at byte \d+\): unknown frame kind 7"):
        OverlayReader(_write(tmp_path, parts)).close()


def test_envelope_entry_with_items_is_refused(tmp_path: Path) -> None:
    parts = _copy("zstd-small-frames")
    last = len(parts.frames) - 1
    parts.entry[last, "item_count"] = 3
    with pytest.raises(FormatError, match=f"frame index entry {last} .*an envelope frame with items"):
        OverlayReader(_write(tmp_path, parts)).close()


@pytest.mark.parametrize(("field", "value"), [("item_count", 0), ("item_count", 2**31), ("end_offset", 0)])
def test_impossible_index_entries_are_refused_before_decompressing(tmp_path: Path, field: str, value: int) -> None:
    parts = _copy("zstd")
    parts.entry[1, field] = value
    with pytest.raises(FormatError, match="frame index entry 1"):
        OverlayReader(_write(tmp_path, parts)).close()


@pytest.mark.parametrize("field", ["first_offset", "end_offset"])
def test_items_outside_the_range_the_index_gives_are_refused(tmp_path: Path, field: str) -> None:
    """Were accepted: an on-demand reader would fetch the wrong frame for an address, and an item
    past the image's end (the metadata checks only the index's end_offset) reached apply."""
    parts = _copy("none")
    entry = parts.frames[0][0]
    parts.entry[0, field] = entry[field] + (4096 if field == "first_offset" else -4096)
    path = _write(tmp_path, parts)
    with OverlayReader(path) as reader, pytest.raises(FormatError, match="reach outside the range the index gives"):
        reader.items(reader.frames[0], NoneCodec())


def test_item_errors_name_the_frame_and_the_offset_in_it(tmp_path: Path) -> None:
    parts = _copy("none")
    entry, stored = parts.frames[1]
    parts.frames[1] = (dict(entry, length=len(stored) - 5), stored[:-5])
    path = _write(tmp_path, parts)
    with OverlayReader(path) as reader, pytest.raises(FormatError) as caught:
        reader.items(reader.frames[1], NoneCodec())
    assert f"frame at byte {entry['file_offset']} (decompressed): item at byte " in str(caught.value)


def test_a_frame_of_many_small_items_parses_in_bounded_memory() -> None:
    """Hundreds of thousands of items from a few kilobytes of zstd: the columns stay within six
    times the decompressed frame (the per-item Python objects of the old parser took fourteen)."""
    record = pack_items([0], [4096], [int(Ref.ZEROS)], [int(ItemType.DISK)], [0], [None])
    plain = record * ((4 << 20) // len(record))  # the same unit over and over: order is apply's to check
    stored = zstandard.ZstdCompressor(level=3).compress(plain)
    assert len(stored) < len(plain) // 1000
    cols = check_untrusted(
        "overlay items", lambda: unpack_items(ZstdCodec().decompress(stored, len(plain))), memory=7 * len(plain)
    )
    assert len(cols) == len(plain) // len(record) and int(cols.lengths[-1]) == 4096


def test_a_zstd_frame_header_cannot_claim_more_than_the_index_length() -> None:
    # a 16-byte frame whose header claims 256 MiB, four times MAX_FRAME (one RLE block follows)
    frame = (
        b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", 256 << 20) + (1 | 1 << 1 | (128 << 10) << 3).to_bytes(3, "little")
    )
    frame += b"\0"
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            ZstdCodec().decompress(frame, 4096)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------------------------
# the overlay must be a regular file (issue item 11: a FIFO hung apply and inspect forever)


def _inspect(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str]:
    code = main(["inspect", str(path)])
    return code, capsys.readouterr().err


def test_a_fifo_overlay_is_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "overlay.fifo"
    os.mkfifo(fifo)
    code, err = _inspect(capsys, fifo)  # used to block in open() until a writer came
    assert code == ConfigError.exit_code and err.count("\n") == 1
    assert f"overlay {fifo} is a FIFO; vmdelta reads only regular files" in err


@pytest.mark.parametrize(("make", "what"), [("directory", "a directory"), ("device", "a character device")])
def test_directories_and_devices_are_not_overlays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str, what: str
) -> None:
    if make == "directory":
        path = tmp_path / "folder"
        path.mkdir()
    else:
        path = Path("/dev/null")
    code, err = _inspect(capsys, path)
    assert code == ConfigError.exit_code and f"overlay {path} is {what};" in err and err.count("\n") == 1


def test_a_socket_is_not_an_overlay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        code, err = _inspect(capsys, path)
    assert code == ConfigError.exit_code and f"overlay {path} is a socket;" in err


def test_a_missing_overlay_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _inspect(capsys, tmp_path / "nope.vmdo")  # was a FormatError (exit 3)
    assert code == 2 and err == f"vmdelta: error: overlay {tmp_path / 'nope.vmdo'} does not exist\n"


def test_a_symlink_to_an_overlay_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "link.vmdo"
    link.symlink_to(GOLDEN / "overlay-zstd.vmdo")
    code, err = _inspect(capsys, link)
    assert code == 0 and err == ""
