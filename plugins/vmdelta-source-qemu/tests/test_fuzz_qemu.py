"""The fuzz contract (:mod:`vmdelta_core.fuzzing`) over every parser of untrusted bytes here: the
stream reader, the mapped-ram reader (the same entry point, a different layout), the end of a
stream (device sections and VM description) and the envelope reader at apply time.

Each input is a real or synthetic snapshot with a few bytes changed, some inserted or the file cut:
opening it gives a correct image (checked against the file it came from) or a clean
:class:`VmdeltaError`, within the contract's time and memory bounds.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from qemu_helpers import rebuild
from qemu_stream_builder import PAGE, StreamBuilder, mapped_ram_stream, pattern, simple_stream
from vmdelta_source_qemu import QemuSource
from vmdelta_source_qemu.envelope import CheckedEnvelope, Run, read_envelope

from vmdelta_core.plugin import SourceImage
from vmdelta_core.testing import check_untrusted, fuzz_settings

#: an accepted image at most this large is checked page by page and rebuilt
_CHECKED = 64 << 20


def rich_stream() -> bytes:
    """Two blocks, sections, re-sent and filled pages, a command, device sections full of footer
    look-alikes and zero bytes."""
    b = StreamBuilder([("pc.ram", 8 * PAGE), ("vga.vram", 4 * PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    for page in range(6):
        b.page("pc.ram", page, pattern(page))
    b.zero("pc.ram", 6)
    b.zero("pc.ram", 7, fill=0x33)
    b.eos_footer()
    b.command()
    b.part(end=True)
    b.zero("pc.ram", 2, force_name=True)
    b.page("vga.vram", 1, pattern(40))
    b.eos_footer()
    b.device(3, "timer", bytes(24) + b"\x7e\x00\x00\x00\x03\x04\x00")
    b.device(4, "cpu", bytes(range(64)))
    b.device(5, "serial", b"\x00" * 8, instance=1)
    return b.finish()


def mapped_stream() -> bytes:
    pages = {("pc.ram", 0): pattern(0), ("pc.ram", 5): pattern(5), ("pc.ram", 6): bytes(PAGE)}
    return mapped_ram_stream([("pc.ram", 16 * PAGE), ("vga.vram", 4 * PAGE)], pages | {("vga.vram", 3): pattern(9)})


STREAMS = {"simple": simple_stream(), "rich": rich_stream()}
MAPPED = mapped_stream()

edits = st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(0, 255)), max_size=6)
inserts = st.lists(st.tuples(st.integers(0, 1 << 32), st.binary(min_size=1, max_size=12)), max_size=2)
cuts = st.none() | st.integers(0, 1 << 32)


def mutate(data: bytes, where: tuple[int, int], edits: list, inserts: list, cut: int | None) -> bytes:
    """``data`` with bytes set and inserted at offsets inside ``where`` (start, stop), then cut."""
    start, stop = where
    span = max(1, min(stop, len(data)) - start)
    out = bytearray(data)
    for at, value in edits:
        out[start + at % span] = value
    for at, blob in inserts:
        at = start + at % span
        out[at:at] = blob
    if cut is not None:
        del out[cut % (len(out) + 1) :]
    return bytes(out)


def regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Where mutations aim: the headers and block table, the RAM records, the device sections and
    the end (EOF byte and description), anywhere."""
    eof = data.rindex(b"\x00\x06")
    return {
        "head": (0, 160),
        "ram": (160, eof - 400),
        "end": (eof - 400, len(data)),
        "anywhere": (0, len(data)),
    }


def open_checked(tmp_path: Path, name: str, data: bytes) -> None:
    """Open ``data`` under the contract; an accepted image must be the file's."""
    path = tmp_path / "fuzz.mem"
    path.write_bytes(data)
    result = check_untrusted(name, lambda: QemuSource().open(path, kind="memory", options={}))
    if not isinstance(result, SourceImage):
        assert "\n" not in str(result)
        return
    with result as image:
        if image.size > _CHECKED:
            return
        for start, length in image.holes.tolist():
            assert not image.data[start : start + length].any()
        if image.exact_artifact:
            assert rebuild(image, tmp_path).read_bytes() == data


@fuzz_settings(150)
@given(
    base=st.sampled_from(sorted(STREAMS)),
    region=st.sampled_from(["head", "ram", "end", "anywhere"]),
    edits=edits,
    inserts=inserts,
    cut=cuts,
)
def test_fuzz_stream(tmp_path: Path, base: str, region: str, edits: list, inserts: list, cut: int | None) -> None:
    data = STREAMS[base]
    open_checked(tmp_path, "qemu stream", mutate(data, regions(data)[region], edits, inserts, cut))


@fuzz_settings(60)
@given(
    region=st.sampled_from(["table", "bitmap", "pages", "end", "anywhere"]),
    edits=edits,
    inserts=inserts,
    cut=cuts,
)
def test_fuzz_mapped_ram(tmp_path: Path, region: str, edits: list, inserts: list, cut: int | None) -> None:
    table = MAPPED.index(b"\x01\x00\x00\x00\x02\x03ram")
    header = table + 17 + 8 + 7 + 8  # START section, MEM_SIZE, "pc.ram", its length
    bitmap = int.from_bytes(MAPPED[header + 12 : header + 20], "big")
    eof = MAPPED.rindex(b"\x00\x06")
    where = {
        "table": (table, bitmap),
        "bitmap": (bitmap, bitmap + 8),
        "pages": (1 << 20, (1 << 20) + 8 * PAGE),
        "end": (eof - 300, len(MAPPED)),
        "anywhere": (0, len(MAPPED)),
    }[region]
    open_checked(tmp_path, "qemu mapped-ram", mutate(MAPPED, where, edits, inserts, cut))


keys = st.sampled_from(["devices", "name", "instance_id", "page_size", "fields"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.sampled_from(["timer", "", "x" * 300]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=12,
)


@fuzz_settings(100)
@given(
    description=st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"{}", b'{"devices": []}', b'{"devices": [{"name": "timer", "instance_id": 0}]}']),
        json_values.map(lambda value: json.dumps(value).encode()),
    ),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 1 << 31]),
)
def test_fuzz_vm_description(tmp_path: Path, description: bytes, length_delta: int) -> None:
    """Whatever the description says, the device sections are checked against it."""
    b = StreamBuilder([("pc.ram", 2 * PAGE)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.ram", 1, pattern(1))
    b.eos_footer()
    b.device(3, "timer", bytes(8))
    length = (len(description) + length_delta) % (1 << 32)
    data = b.bytes() + b"\x00\x06" + length.to_bytes(4, "big") + description
    open_checked(tmp_path, "qemu stream", data)


@pytest.fixture(scope="module")
def envelopes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, int]]:
    """The envelope and image size of each kind of snapshot, as an overlay carries them."""
    folder = tmp_path_factory.mktemp("envelopes")
    out: dict[str, tuple[bytes, int]] = {}
    for name, data in (("stream", STREAMS["rich"]), ("mapped", MAPPED)):
        (folder / name).write_bytes(data)
        with QemuSource().open(folder / name, kind="memory", options={}) as image:
            out[name] = (image.envelope, image.size)
    return out


@fuzz_settings(150)
@given(
    name=st.sampled_from(["stream", "mapped"]),
    near=st.booleans(),
    edits=edits,
    inserts=inserts,
    cut=cuts,
    size_delta=st.sampled_from([0, 0, 0, PAGE, -PAGE, 1 << 40]),
)
def test_fuzz_read_envelope(
    envelopes: dict[str, tuple[bytes, int]],
    name: str,
    near: bool,
    edits: list,
    inserts: list,
    cut: int | None,
    size_delta: int,
) -> None:
    """The envelope comes from the overlay: checked against the image it is applied to, or refused."""
    envelope, size = envelopes[name]
    data = mutate(envelope, (0, 200) if near else (0, len(envelope)), edits, inserts, cut)
    size = max(0, size + size_delta)
    result = check_untrusted("qemu envelope", lambda: read_envelope(data, size))
    if isinstance(result, CheckedEnvelope):
        blocks = result.blocks
        assert sum(block.length for block in blocks) == size
        assert all(b.offset == a.offset + a.length for a, b in itertools.pairwise(blocks))
        covered = np.zeros(size // PAGE, np.int8)
        for op in result.envelope.ops:
            if not isinstance(op, bytes):
                block = blocks[op.block]
                first, count = (op.first_page, op.count) if isinstance(op, Run) else (0, block.pages)
                assert first + count <= block.pages
                covered[block.first_page + first : block.first_page + first + count] += 1
        assert covered.max(initial=0) <= 1


@pytest.mark.fixtures
@fuzz_settings(40)
@given(region=st.sampled_from(["head", "end"]), edits=edits, inserts=inserts, cut=cuts)
def test_fuzz_real_stream(
    fixture_set: Path, tmp_path: Path, region: str, edits: list, inserts: list, cut: int | None
) -> None:
    """The device state and description of a real capture (the x-ignore-shared one: device state
    alone, its RAM in the RAM file)."""
    folder = fixture_set / "variants/qemu-7.2-ignore-shared"
    data = (folder / "modified.mem").read_bytes()
    damaged = mutate(data, regions(data)[region], edits, inserts, cut)
    path = tmp_path / "fuzz.mem"
    path.write_bytes(damaged)
    options = {"ram": str(folder / "modified-ram.raw")}
    result = check_untrusted("qemu stream", lambda: QemuSource().open(path, kind="memory", options=options))
    if isinstance(result, SourceImage):
        result.close()
