"""Hostile or damaged envelopes at apply time: a FormatError or a sound artifact, nothing else.

The envelope reaches ``materialize`` from the overlay, so it is untrusted even when every checksum
holds. Whatever it says, ``materialize`` either refuses with a :class:`FormatError` or writes an
artifact of bounded size at ``output`` (and the x-ignore-shared RAM file where the user said),
and nowhere else.
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu_stream_builder import PAGE, StreamBuilder, ignore_shared_stream, pattern, simple_stream
from vmdelta_source_qemu import QemuSource
from vmdelta_source_qemu.envelope import MAX_BLOCKS, Envelope, Mapped, Run, read_envelope

from vmdelta_core.plugin import FormatError, RebuiltImage, SourceImage
from vmdelta_core.testing import ENTRY_SIZE, FRAME_INDEX_ENTRY, TRAILER, TRAILER_SIZE, main, rewrite_overlay

MIB = 1 << 20


def mapped_envelope(image_size: int) -> bytes:
    """A mapped-ram envelope over one block: header with its bitmap and page offsets, the block, a tail."""
    head = b"QEVM" + bytes(60)
    bitmap_at = len(head) + 28
    pages_at = -(-(bitmap_at + (image_size // PAGE + 63) // 64 * 8) // MIB) * MIB
    header = bytes(12) + struct.pack(">QQ", bitmap_at, pages_at)
    meta = {"format": "mapped-ram", "blocks": [["pc.ram", 0, image_size]], "external": []}
    return Envelope(meta, [head + header, Mapped(0, b"\x01"), b"\x00tail"]).to_bytes()


class Target:
    """A valid rebuilt image and the envelope (and layout) the plugin made for it."""

    def __init__(self, folder: Path, image: SourceImage, envelope: bytes | None = None) -> None:
        self.folder = folder
        self.image = image
        self.envelope = image.envelope if envelope is None else envelope
        self.raw = folder / "rebuilt.raw"
        image.data.tofile(self.raw)

    def write(self, envelope: bytes, folder: Path) -> None:
        """Materialize with ``envelope`` as apply would: ``out.mem`` in ``folder``, the RAM file beside."""
        rebuilt = RebuiltImage(
            path=self.raw,
            size=self.image.size,
            unit_size=PAGE,
            envelope=envelope,
            layout=self.image.layout,
            changed=np.zeros(0, np.int64),
            base=self.image,
            base_path=self.raw,
            side_outputs={"ram": folder / "ram-out.raw"},
        )
        QemuSource().materialize(rebuilt, folder / "out.mem")

    def materialize(self, envelope: bytes) -> list[str] | None:
        """The files written with ``envelope``, or None when it is refused (with a FormatError)."""
        with tempfile.TemporaryDirectory(dir=self.folder) as work:
            folder = Path(work)
            try:
                self.write(envelope, folder)
            except FormatError as exc:
                assert "\n" not in str(exc)
                return None
            written = sorted(p.name for p in folder.iterdir())
            assert set(written) <= {"out.mem", "ram-out.raw"}, written
            size = sum(p.stat().st_size for p in folder.iterdir())
            mapped = sum(isinstance(op, Mapped) for op in Envelope.from_bytes(envelope).ops)
            # verbatim bytes, each page at most once as a record (or in the RAM file), mapped-ram gaps
            assert size <= len(envelope) + 2 * self.image.size + mapped * MIB, size
            return written


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    folder = tmp_path_factory.mktemp("hostile")
    for name in ("stream", "shared", "mapped"):
        (folder / name).mkdir()
    (folder / "simple.mem").write_bytes(simple_stream())
    shared, ram = ignore_shared_stream()
    (folder / "shared.mem").write_bytes(shared)
    (folder / "shared-ram.raw").write_bytes(ram)
    simple = QemuSource().open(folder / "simple.mem", kind="memory", options={})
    image = QemuSource().open(folder / "shared.mem", kind="memory", options={"ram": str(folder / "shared-ram.raw")})
    return {
        "stream": Target(folder / "stream", simple),
        "shared": Target(folder / "shared", image),
        "mapped": Target(folder / "mapped", image, mapped_envelope(image.size)),
    }


@pytest.mark.parametrize("name", ["stream", "shared", "mapped"])
def test_unmodified_envelopes_are_written(targets: dict[str, Target], name: str) -> None:
    written = targets[name].materialize(targets[name].envelope)
    assert written is not None
    assert ("ram-out.raw" in written) == (name == "shared")


# ------------------------------------------------------------------------------------------------
# (a) mutations of the envelope handed straight to materialize
# ------------------------------------------------------------------------------------------------

byte_edits = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=6)


def _edit(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    damaged = bytearray(data)
    for at, value in edits:
        damaged[at % len(damaged)] = value
    return bytes(damaged if cut is None else damaged[: cut % (len(damaged) + 1)])


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["stream", "shared", "mapped"]),
    edits=byte_edits,
    cut=st.none() | st.integers(0, 1 << 20),
    # most bytes of an envelope are device state; aim half the edits at its metadata and operations
    near=st.booleans(),
)
def test_damaged_envelope_bytes(
    targets: dict[str, Target], name: str, edits: list, cut: int | None, near: bool
) -> None:
    target = targets[name]
    if near:
        edits = [(at % 256, value) for at, value in edits]
    target.materialize(_edit(target.envelope, edits, cut))


scalars = st.one_of(
    st.integers(-(1 << 66), 1 << 66),
    st.sampled_from([0, PAGE, 2 * PAGE, 3 * PAGE, 8 * PAGE, 10 * PAGE, 1 << 63, -PAGE]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.sampled_from(["pc.ram", "pc.bios", "vga.vram", "x" * 300, "\u20ac", ""]),
    st.none(),
    st.booleans(),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
ops = st.one_of(
    st.builds(
        Run,
        st.integers(0, 3),
        st.integers(0, 1 << 40) | st.integers(0, 12),
        st.integers(0, 12) | st.integers(0, (1 << 32) - 1),
        st.booleans(),
        st.binary(max_size=4),
    ),
    st.builds(Mapped, st.integers(0, 3), st.binary(max_size=4)),
    st.binary(max_size=64),
)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["stream", "shared", "mapped"]),
    meta_edits=st.lists(
        st.tuples(st.sampled_from(["format", "blocks", "external", "row", "cell"]), values), max_size=3
    ),
    op_edits=st.lists(st.tuples(st.integers(0, 63), st.sampled_from(["replace", "insert", "drop"]), ops), max_size=4),
)
def test_hostile_envelope_fields(targets: dict[str, Target], name: str, meta_edits: list, op_edits: list) -> None:
    target = targets[name]
    envelope = Envelope.from_bytes(target.envelope)
    meta = json.loads(json.dumps(envelope.meta))
    for key, value in meta_edits:
        if key in ("row", "cell") and isinstance(meta["blocks"], list) and meta["blocks"]:
            row = meta["blocks"][0]
            if key == "row":
                meta["blocks"][0] = value
            elif isinstance(row, list) and row:
                row[len(json.dumps(value)) % len(row)] = value
        else:
            meta[key] = value
    changed = list(envelope.ops)
    for at, how, op in op_edits:
        at %= len(changed) + 1
        if how == "insert" or not changed:
            changed.insert(at, op)
        elif how == "replace":
            changed[at % len(changed)] = op
        else:
            del changed[at % len(changed)]
    try:
        data = Envelope(meta, changed).to_bytes()
    except (ValueError, struct.error):  # a value the wire form cannot hold (NaN in JSON is fine)
        return
    target.materialize(data)


def test_one_envelope_covering_the_image_many_times_is_refused(targets: dict[str, Target]) -> None:
    target = targets["stream"]
    envelope = Envelope.from_bytes(target.envelope)
    again = Envelope(envelope.meta, [*envelope.ops, *[Run(0, 0, 8, True)] * 1000]).to_bytes()
    with pytest.raises(FormatError, match="already written"):
        read_envelope(again, target.image.size)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"format": "stream", "blocks": [["pc.ram", 0, float("inf")]]}, r"blocks\[0\]: length inf"),
        ({"format": "stream", "blocks": [["\u20ac", 0, 10 * PAGE]]}, "latin-1"),
        ({"format": "stream", "blocks": [["x" * 256, 0, 10 * PAGE]]}, "1 to 255"),
        ({"format": "stream", "blocks": [["a", PAGE, 10 * PAGE]]}, "does not follow"),
        ({"format": "stream", "blocks": [["a", 0, 9 * PAGE]]}, "rebuilt image is 40960"),
        ({"format": "stream", "blocks": [["a", 0, PAGE]] * (MAX_BLOCKS + 1)}, "at most 1024"),
        ({"format": "stream", "blocks": [["a", 0, 10 * PAGE]], "external": ["b"]}, "does not list"),
        ({"format": "tape", "blocks": [["a", 0, 10 * PAGE]]}, "format 'tape'"),
    ],
)
def test_block_tables_that_do_not_fit_the_image(meta: dict, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        read_envelope(Envelope(meta, []).to_bytes(), 10 * PAGE)


def test_deeply_nested_metadata_is_a_format_error() -> None:
    meta = b"[" * 100_000
    with pytest.raises(FormatError, match="not JSON"):
        read_envelope(b"QEMUENV1" + struct.pack(">I", len(meta)) + meta + b"\x00", PAGE)


def test_mapped_pages_far_past_the_bitmap_are_refused(targets: dict[str, Target], tmp_path: Path) -> None:
    target = targets["mapped"]
    envelope = Envelope.from_bytes(target.envelope)
    head = envelope.ops[0]
    assert isinstance(head, bytes)
    far = head[:-8] + struct.pack(">Q", 1 << 50)
    with pytest.raises(FormatError, match="does not match its position"):
        target.write(Envelope(envelope.meta, [far, *envelope.ops[1:]]).to_bytes(), tmp_path)


def test_mapped_block_with_no_header_before_it(targets: dict[str, Target], tmp_path: Path) -> None:
    target = targets["mapped"]
    envelope = Envelope.from_bytes(target.envelope)
    with pytest.raises(FormatError, match="no mapped-ram header"):
        target.write(Envelope(envelope.meta, envelope.ops[1:]).to_bytes(), tmp_path)


@pytest.mark.fixtures
@settings(max_examples=6, deadline=None)
@given(edits=byte_edits, near=st.booleans())
def test_damaged_real_envelope(real_target: Target, edits: list, near: bool) -> None:
    if near:  # the metadata, block table and first operations
        edits = [(at % 2048, value) for at, value in edits]
    real_target.materialize(_edit(real_target.envelope, edits, None))


@pytest.fixture(scope="module")
def real_target(fixture_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The mapped-ram capture: its envelope holds bytes, mapped blocks and the block table."""
    image = QemuSource().open(fixture_set / "variants/qemu-10.0-mapped-ram/modified.mem", kind="memory", options={})
    with image:
        yield Target(tmp_path_factory.mktemp("real"), image)


# ------------------------------------------------------------------------------------------------
# (b) end to end: a damaged but resealed overlay through ``vmdelta apply``
# ------------------------------------------------------------------------------------------------


def two_streams() -> tuple[bytes, bytes]:
    def stream(seed: int) -> bytes:
        b = StreamBuilder([("pc.ram", 12 * PAGE), ("vga.vram", 2 * PAGE)])
        b.start()
        b.eos_footer()
        b.part(end=True)
        for page in range(12):
            if page % 3:
                b.page("pc.ram", page, pattern(page + seed * (page % 2)))
            else:
                b.zero("pc.ram", page)
        b.page("vga.vram", 0, pattern(seed))
        b.zero("vga.vram", 1)
        b.eos_footer()
        b.devices()
        return b.finish()

    return stream(0), stream(5)


@pytest.fixture(scope="module")
def overlay_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    folder = tmp_path_factory.mktemp("e2e")
    base, modified = two_streams()
    (folder / "base.mem").write_bytes(base)
    (folder / "modified.mem").write_bytes(modified)
    overlay = folder / "vm.overlay"
    assert (
        main(["create", "-q", "-o", str(overlay), "--memory", str(folder / "base.mem"), str(folder / "modified.mem")])
        == 0
    )
    base_envelope = QemuSource().open(folder / "base.mem", kind="memory", options={}).envelope
    return folder, overlay.read_bytes(), base_envelope


def _envelope_frame(data: bytes) -> tuple[bytes, int]:
    trailer = TRAILER.parse(data[-TRAILER_SIZE:])
    for k in range(trailer.index_count):
        entry = FRAME_INDEX_ENTRY.parse(data[trailer.index_offset + k * ENTRY_SIZE :][:ENTRY_SIZE])
        if entry.kind == "envelope":
            return data[entry.file_offset : entry.file_offset + entry.stored_length], entry.length
    raise AssertionError("the overlay holds no envelope")


def test_damaged_resealed_overlays_through_the_cli(
    overlay_pair: tuple[Path, bytes, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, data, base_envelope = overlay_pair
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMDELTA_DEBUG", raising=False)
    stored, length = _envelope_frame(data)
    dictionary = zstandard.ZstdCompressionDict(base_envelope, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    envelope = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(stored, max_output_size=length)
    trailer = TRAILER.parse(data[-TRAILER_SIZE:])
    metadata = json.loads(data[trailer.metadata_offset : trailer.metadata_offset + trailer.metadata_length])
    rng = random.Random(7)
    out = tmp_path / "out.mem"
    outcomes: dict[int, int] = {}
    for round_ in range(60):
        damaged_meta = None
        how = round_ % 3
        if how == 0:  # bits of the envelope itself, compressed again against the base's
            flipped = bytearray(envelope)
            for _ in range(rng.choice([1, 2, 8])):
                at = rng.randrange(len(flipped)) if rng.random() < 0.5 else rng.randrange(min(300, len(flipped)))
                flipped[at] ^= 1 << rng.randrange(8)
            compressed = zstandard.ZstdCompressor(dict_data=dictionary).compress(bytes(flipped))
            damaged = rewrite_overlay(data, envelope=(0, compressed, len(flipped)))
        elif how == 1:  # bits of the stored frame
            flipped = bytearray(stored)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            damaged = rewrite_overlay(data, envelope=(0, bytes(flipped), length))
        else:  # bits of the layout as the metadata spells it, where they still make JSON
            damaged_meta = json.loads(json.dumps(metadata))
            text = bytearray(json.dumps(metadata["images"][0]["layout"]).encode())
            for _ in range(50):
                trial = bytearray(text)
                trial[rng.randrange(len(trial))] ^= 1 << rng.randrange(7)
                try:
                    layout = json.loads(trial)
                except ValueError:
                    continue
                if isinstance(layout, dict):
                    damaged_meta["images"][0]["layout"] = layout
                    break
            damaged = rewrite_overlay(data, metadata=damaged_meta)
        overlay = tmp_path / "damaged.overlay"
        overlay.write_bytes(damaged)
        code = main(["apply", "-q", str(overlay), "--memory", str(folder / "base.mem"), str(out)])
        err = capsys.readouterr().err
        outcomes[code] = outcomes.get(code, 0) + 1
        if code:
            assert err.startswith("vmdelta: error: ") and err.count("\n") == 1, err
            assert not out.exists()
        else:
            assert out.read_bytes() == (folder / "modified.mem").read_bytes()
            out.unlink()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "damaged.overlay"]
    assert outcomes.get(3, 0) + outcomes.get(4, 0) > 0, outcomes
