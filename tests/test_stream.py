"""The stream form of container v1 (``schemas/overlay-v1-stream.md``): converting between the forms
is byte-exact, StreamReader reads what OverlayReader reads, and damage of every kind is refused."""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import numpy as np
import pytest
import xxhash
from samples import sample_pair, write_pair

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.components import SideFile, Source, SourceImage
from vmdelta_core.errors import FormatError, IntegrityError, VmdeltaError
from vmdelta_core.fileio import open_file_image
from vmdelta_core.fuzzing import check_untrusted
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.overlay.container import FrameEntry, OverlayReader, pack_entry
from vmdelta_core.overlay.convert import convert_overlay
from vmdelta_core.overlay.parts import split_document
from vmdelta_core.overlay.schema import TRAILER
from vmdelta_core.overlay.stream import StreamReader
from vmdelta_core.testing import registry_with

FILES = ["overlay-none.vmdo", "overlay-zstd.vmdo", "overlay-zstd-whole-digest.vmdo"]
STREAM = "overlay-zstd-stream.vmds"


class Noted(Source):
    """A raw image with a note beside it, which becomes its envelope."""

    name = "stream-noted"
    side_files = (SideFile("note", "a few bytes kept beside the image"),)

    def open(self, path: Path, *, kind: Any, options: Mapping[str, Any]) -> SourceImage:
        return open_file_image(path, kind, envelope=Path(options["note"]).read_bytes())


class NotedPlugin:
    @hookimpl
    def vmdelta_register_sources(self, register: Callable[[Source], None]) -> None:
        register(Noted())


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A memory and a disk image, each with an envelope, in the file form."""
    folder = tmp_path_factory.mktemp("created")
    specs = []
    for seed, kind in enumerate(("memory", "disk")):
        base, modified = sample_pair(seed=seed + 3, units=64, grow=100 * seed)
        modified[24 * 4096 : 64 * 4096] = np.random.default_rng(seed).integers(0, 256, 40 * 4096, dtype=np.uint8)
        base, modified = write_pair(folder, kind, base, modified)  # new data: several frames an image
        notes = {which: folder / f"{kind}.{which}.note" for which in ("base", "modified")}
        for which, note in notes.items():
            note.write_bytes(f"{which} {kind} note: device state\n".encode() * (seed + 2))
        sides = {"base_sides": {"note": notes["base"]}, "modified_sides": {"note": notes["modified"]}}
        specs.append(ImageSpec(kind, base, modified, format="stream-noted", **sides))
    overlay = folder / "created.vmdo"
    config = CreateConfig(overlay, specs, frame_size=65536, cache_dir=folder / "cache")
    create_overlay(config, registry=registry_with(NotedPlugin()))
    return overlay


@pytest.fixture(params=[*FILES, "created"])
def overlay(request: pytest.FixtureRequest, golden_dir: Path) -> Path:
    return request.getfixturevalue("created") if request.param == "created" else golden_dir / request.param


def to_stream(path: Path) -> bytes:
    out = io.BytesIO()
    with OverlayReader(path) as reader:
        assert convert_overlay(reader, out, stream=True) == len(out.getvalue())
    return out.getvalue()


def from_stream(data: bytes, *, stream: bool = False) -> bytes:
    out = io.BytesIO()
    assert convert_overlay(StreamReader(io.BytesIO(data), "stream"), out, stream=stream) == len(out.getvalue())
    return out.getvalue()


def read_stream(file: BinaryIO) -> tuple[dict[str, Any], list[tuple[FrameEntry, bytes]]]:
    reader = StreamReader(file, "stream")
    frames = list(iter(reader.next_frame, None))
    assert reader.metadata is not None
    return reader.metadata, frames


def read_file(path: Path) -> tuple[dict[str, Any], list[tuple[FrameEntry, bytes]]]:
    with OverlayReader(path) as reader:
        reader.verify()
        return reader.metadata, [(entry, reader.stored(entry)) for entry in reader.frames]


def piped(data: bytes) -> BinaryIO:
    """A pipe that ``data`` comes through in small pieces, from another thread."""
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb", buffering=0) as f:
            try:
                for at in range(0, len(data), 777):
                    f.write(data[at : at + 777])
            except BrokenPipeError:  # the reader refused the stream before its end
                pass

    threading.Thread(target=feed, daemon=True).start()
    return os.fdopen(r, "rb")


def build_stream(prologue: Mapping[str, Any], epilogue: Any, frames: list[tuple[FrameEntry, bytes]]) -> bytes:
    """A stream-form overlay put together from the specification alone, not by the writer."""
    out = bytearray(b"\x89VMDELTA" + struct.pack(">HHI", 1, 1, 0))
    body, meta = (json.dumps(d, sort_keys=True, separators=(",", ":")).encode() for d in (prologue, epilogue))
    out += b"P" + struct.pack(">I", len(body)) + body + struct.pack(">Q", xxhash.xxh3_64_intdigest(body))
    entries = []
    for entry, stored in frames:
        entries.append(pack_entry(attrs.evolve(entry, file_offset=len(out) + 49)))
        out += b"F" + entries[-1] + stored
    out += b"E" + struct.pack(">I", len(meta))
    meta_offset = len(out)
    out += meta
    index = b"".join(entries)
    sums = [xxhash.xxh3_64_intdigest(meta), meta_offset + len(meta), len(entries), xxhash.xxh3_64_intdigest(index)]
    out += index + struct.pack(">QQQQQQ", meta_offset, len(meta), *sums)
    return reseal(bytes(out) + bytes(16))


def reseal(data: bytes) -> bytes:
    """``data`` with its whole-overlay checksum made to fit again (the trailer's last 16 bytes)."""
    return data[:-16] + xxhash.xxh3_64_intdigest(data[:-16]).to_bytes(8, "big") + b"VMDLTEND"


# --------------------------------------------------------------------------------------------
# conversion


def test_file_to_stream_to_file_is_byte_exact(overlay: Path, tmp_path: Path) -> None:
    data, stream = overlay.read_bytes(), to_stream(overlay)
    assert stream[10:12] == b"\x00\x01" and from_stream(stream) == data
    again = tmp_path / "again.vmds"
    again.write_bytes(stream)  # stream -> file -> stream, and each form to itself
    assert to_stream(again) == stream and from_stream(stream, stream=True) == stream
    with OverlayReader(again) as reader:
        out = io.BytesIO()
        convert_overlay(reader, out, stream=False)
    assert out.getvalue() == data


def test_the_stream_form_holds_the_same_frames_and_metadata(overlay: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.vmds"
    path.write_bytes(to_stream(overlay))
    (meta, frames), (s_meta, s_frames) = read_file(overlay), read_file(path)
    assert s_meta == meta and [s for _, s in s_frames] == [s for _, s in frames]
    assert [attrs.evolve(e, file_offset=0) for e, _ in s_frames] == [attrs.evolve(e, file_offset=0) for e, _ in frames]
    assert build_stream(*split_document(meta), frames) == path.read_bytes()  # the writer follows the text


def test_golden_stream_is_the_golden_file_converted(golden_dir: Path) -> None:
    stream = (golden_dir / STREAM).read_bytes()
    assert from_stream(stream) == (golden_dir / "overlay-zstd.vmdo").read_bytes()
    assert to_stream(golden_dir / "overlay-zstd.vmdo") == stream
    assert read_stream(io.BytesIO(stream))[0] == read_file(golden_dir / "overlay-zstd.vmdo")[0]


def test_frames_come_image_by_image_in_address_order(created: Path) -> None:
    _, frames = read_stream(io.BytesIO(to_stream(created)))
    images = [e.image for e, _ in frames]
    assert images == sorted(images) and {e.image for e, _ in frames if e.kind == "envelope"} == {0, 1}
    for image in set(images):
        items = [e for e, _ in frames if e.image == image and e.kind == "items"]
        assert all(a.end_offset <= b.first_offset for a, b in itertools.pairwise(items))


def test_a_damaged_file_is_refused_before_anything_is_written(golden_dir: Path, tmp_path: Path) -> None:
    data = bytearray((golden_dir / "overlay-zstd.vmdo").read_bytes())
    data[40] ^= 1  # inside the first frame
    (path := tmp_path / "damaged.vmdo").write_bytes(data)
    out = io.BytesIO()
    with OverlayReader(path) as reader, pytest.raises(IntegrityError, match="checksum mismatch"):
        convert_overlay(reader, out, stream=True)
    assert out.getvalue() == b""


# --------------------------------------------------------------------------------------------
# pipes


@pytest.mark.parametrize("name", [STREAM, "created"])
def test_stream_reader_over_a_pipe_reads_what_overlay_reader_reads(name: str, golden_dir: Path, created: Path) -> None:
    path = created if name == "created" else golden_dir / name
    data = path.read_bytes() if name == STREAM else to_stream(path)
    with piped(data) as f:
        meta, frames = read_stream(f)
    assert (meta, frames) == read_stream(io.BytesIO(data))
    assert meta == read_file(path)[0] and [s for _, s in frames] == [s for _, s in read_file(path)[1]]


def test_convert_reads_from_a_pipe_and_writes_to_one(golden_dir: Path) -> None:
    stream = (golden_dir / STREAM).read_bytes()
    r, w = os.pipe()

    def convert() -> None:
        with os.fdopen(w, "wb") as out, piped(stream) as f:
            convert_overlay(StreamReader(f, "standard input"), out, stream=True)

    thread = threading.Thread(target=convert)
    thread.start()
    with os.fdopen(r, "rb") as f:
        assert f.read() == stream
    thread.join()


# --------------------------------------------------------------------------------------------
# damage


def refusal(read: Callable[..., object], *args: Any) -> VmdeltaError | None:
    try:
        read(*args)
    except (FormatError, IntegrityError) as exc:
        return exc
    return None


def test_every_truncation_is_refused(golden_dir: Path, tmp_path: Path) -> None:
    data, path = (golden_dir / STREAM).read_bytes(), tmp_path / "cut.vmds"
    path.write_bytes(data)
    for cut in reversed(range(len(data))):
        assert refusal(read_stream, io.BytesIO(data[:cut])), f"stream cut at {cut} was accepted"
        os.truncate(path, cut)
        assert refusal(read_file, path), f"file cut at {cut} was accepted"


def test_a_changed_byte_anywhere_is_refused(golden_dir: Path, tmp_path: Path) -> None:
    data, path = (golden_dir / STREAM).read_bytes(), tmp_path / "changed.vmds"
    for at in range(0, len(data), 3):
        damaged = bytearray(data)
        damaged[at] ^= 1 << (at % 8) if at % 5 else 0xFF
        assert refusal(read_stream, io.BytesIO(damaged)), f"change at {at} was accepted"
        path.write_bytes(damaged)
        assert refusal(read_file, path), f"change at {at} was accepted by OverlayReader"


@pytest.mark.parametrize("extra", [b"\0", b"more data", "the overlay again"])
def test_data_after_the_trailer_is_refused(extra: Any, golden_dir: Path, tmp_path: Path) -> None:
    data = (golden_dir / STREAM).read_bytes()
    data += data if extra == "the overlay again" else extra
    with pytest.raises(FormatError, match="data after the end"):
        read_stream(io.BytesIO(data))
    (tmp_path / "longer.vmds").write_bytes(data)
    assert isinstance(refusal(read_file, tmp_path / "longer.vmds"), FormatError)


def test_a_file_form_overlay_is_refused_with_how_to_convert_it(golden_dir: Path) -> None:
    with (golden_dir / "overlay-zstd.vmdo").open("rb") as f, pytest.raises(FormatError, match="vmdelta convert"):
        StreamReader(f, "standard input")


def heads(data: bytes) -> tuple[int, int]:
    """Where the first frame's head starts, and where the epilogue's tag is."""
    trailer = TRAILER.parse(data[-64:])
    return 16 + 1 + 4 + int.from_bytes(data[17:21], "big") + 8, trailer.metadata_offset - 5


@pytest.mark.parametrize(("field", "where"), [("prologue", 17), ("frame", 1 + 8), ("epilogue", 1)])
def test_a_length_of_a_gigabyte_is_refused_without_allocating_it(field: str, where: int, golden_dir: Path) -> None:
    data = bytearray((golden_dir / STREAM).read_bytes())
    at = where + (0 if field == "prologue" else heads(data)[field == "epilogue"])
    data[at : at + 4] = (1 << 30).to_bytes(4, "big")
    with piped(bytes(data)) as f:
        result = check_untrusted("stream-form overlay", lambda: read_stream(f), memory=8 << 20)
    assert isinstance(result, FormatError), result


def _refused_by_both(data: bytes, tmp_path: Path, match: str) -> None:
    result = check_untrusted("stream-form overlay", lambda: read_stream(io.BytesIO(data)), memory=8 << 20)
    assert isinstance(result, FormatError) and match in str(result), result
    (tmp_path / "hostile.vmds").write_bytes(data)
    with pytest.raises(FormatError, match=match):
        read_file(tmp_path / "hostile.vmds")


@pytest.mark.parametrize(
    ("change", "message"),
    [("images.1.size", "does not complete its prologue"), ("unit_size", "holds fields other than images")],
)
def test_an_epilogue_redefining_a_prologue_field_is_refused(change: str, message: str, golden_dir: Path, tmp_path):
    meta, frames = read_file(golden_dir / "overlay-zstd.vmdo")
    prologue, epilogue = split_document(meta)
    *path, key = change.split(".")
    (epilogue["images"][int(path[1])] if path else epilogue)[key] = 512
    _refused_by_both(build_stream(prologue, epilogue, frames), tmp_path, message)


def test_a_prologue_that_gives_an_epilogue_field_is_refused(golden_dir: Path, tmp_path: Path) -> None:
    meta, frames = read_file(golden_dir / "overlay-zstd.vmdo")
    prologue, epilogue = split_document(meta)
    prologue["images"][0]["digest"] = "xxh3-128-chunked:" + "0" * 32  # the epilogue gives another
    _refused_by_both(build_stream(prologue, epilogue, frames), tmp_path, "prologue")


def test_a_frame_head_that_differs_from_the_index_is_refused_by_both_readers(golden_dir: Path, tmp_path: Path) -> None:
    data = bytearray((golden_dir / STREAM).read_bytes())
    at = heads(data)[0] + 1 + 32  # the first head's end_offset
    data[at : at + 8] = (int.from_bytes(data[at : at + 8], "big") + 4096).to_bytes(8, "big")
    data = bytearray(reseal(bytes(data)))
    assert isinstance(refusal(read_stream, io.BytesIO(data)), IntegrityError)
    (tmp_path / "head.vmds").write_bytes(data)
    assert refusal(read_file, tmp_path / "head.vmds")
