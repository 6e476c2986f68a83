"""The end of a stream: only a stream that ends as QEMU ends one is read, a cut or padded one never.

A cut inside the device sections after a zero byte used to pass for a stream without a VM
description. Now the description must end the file, and the device sections must be the ones it
lists, the last footer right before the EOF byte.
"""

from __future__ import annotations

import contextlib
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from qemu_stream_builder import PAGE, StreamBuilder, mapped_ram_stream, pattern, simple_stream
from vmdelta_source_qemu import QemuSource
from vmdelta_source_qemu.stream import ParsedStream, parse_stream
from vmdelta_source_qemu.vmdesc import VmDescription, find_description, walk_devices

from vmdelta_core.plugin import FormatError, map_readonly

REFUSED_END = r"truncated|after the end of the stream|does not end"


def parse(data: bytes | np.ndarray) -> ParsedStream:
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    parsed = parse_stream(buf)
    parsed.image.close()
    return parsed


def zero_cuts(view: memoryview, start: int, stop: int) -> list[int]:
    """Every cut right after a zero byte in ``view[start:stop]``."""
    return (np.flatnonzero(np.frombuffer(view[start:stop], np.uint8) == 0) + start + 1).tolist()


def builder() -> StreamBuilder:
    b = StreamBuilder([("pc.ram", 2 * PAGE)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.ram", 0, pattern(0))
    b.eos_footer()
    return b


# -- synthetic streams --------------------------------------------------------------------------


def test_the_whole_stream_is_read_to_its_description() -> None:
    data = simple_stream()
    parsed = parse(data)
    assert parsed.description.eof == data.rindex(b"\x00\x06")
    assert parsed.description.devices == (("timer", 0), ("cpu", 0))
    assert data[parsed.devices_at] == 0x04


def test_every_cut_is_refused() -> None:
    data = simple_stream()
    for cut in range(len(data)):
        with pytest.raises(FormatError, match=rf"{REFUSED_END}|QEVM magic"):
            parse(data[:cut])


def test_every_cut_of_a_mapped_ram_file_is_refused() -> None:
    """A mapped-ram file ends where the stream after its last block's pages ends: cut in its
    header, block table, bitmap, page area, RAM section ends, device state or description, it is
    refused."""
    data = mapped_ram_stream([("pc.ram", 16 * PAGE), ("vga.vram", 4 * PAGE)], {("pc.ram", 5): pattern(5)})
    parse(data)
    second = data.index(b"vga.vram")  # the second block's entry, header and bitmap
    tail = (2 << 20) + 4 * PAGE - 64  # the end of its pages, the RAM sections' ends, device state
    pages = range(200, tail, 7919)
    cuts = [*range(200), *pages, *range(second - 50, second + 100), *range(tail, len(data))]
    view = np.frombuffer(data, np.uint8)
    for cut in cuts:
        with pytest.raises(FormatError, match=rf"{REFUSED_END}|QEVM magic"):
            parse(view[:cut])


def test_a_cut_after_a_zero_byte_with_the_description_put_back_is_refused() -> None:
    """The description alone does not make a stream whole: the device sections must reach the EOF byte."""
    b = builder()
    b.devices()
    data = b.finish()
    start = parse(data).devices_at
    description = b.description()
    eof = len(b.bytes()) - len(description) - 1
    cuts = zero_cuts(memoryview(data), start, eof)
    assert len(cuts) > 20
    for cut in cuts:
        with pytest.raises(FormatError, match=r"device|EOF byte"):
            parse(data[:cut] + description)


def test_a_stream_without_a_description_is_refused_naming_suppress_vmdesc() -> None:
    data = simple_stream(vmdesc=False)
    with pytest.raises(FormatError, match=rf"truncated at offset {len(data)}: .*suppress-vmdesc=on"):
        parse(data)


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b"x", r"1 bytes after the end of the stream at offset {end}"),
        (b"\x00" * 4096, r"4096 zero bytes after the end of the stream at offset {end}"),
        (b"\x00\x06\x00\x00\x00\x00", r"the VM description at offset {size} is not valid JSON"),
        (b"\x7e\x00\x00\x00\x04", r"truncated or damaged at offset {size}"),
    ],
)
def test_bytes_after_the_description_are_refused(tail: bytes, message: str) -> None:
    data = simple_stream()
    with pytest.raises(FormatError, match=message.format(end=len(data), size=len(data) + len(tail))):
        parse(data + tail)


def test_a_second_description_is_refused() -> None:
    b = builder()
    b.devices()
    data = b.finish()
    with pytest.raises(FormatError, match=r"device section 'cpu' at offset \d+ does not end|last device section"):
        parse(data + b"\x00" + b.description())


def test_a_cut_inside_the_description_names_its_length() -> None:
    data = simple_stream()
    at = data.rindex(b"\x00\x06") + 6
    with pytest.raises(FormatError, match=rf"the VM description at offset {at} is {len(data) - at} bytes, .* 10 of"):
        parse(data[: at + 10])


def describe(b: StreamBuilder, devices: list[dict]) -> bytes:
    desc = json.dumps({"page_size": PAGE, "devices": devices}).encode()
    return b.bytes() + b"\x00\x06" + struct.pack(">I", len(desc)) + desc


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d[::-1], r"expected the section of device 'cpu' instance 0"),
        (lambda d: d[:1], r"last device section \('timer'"),
        (lambda d: [*d, {"name": "rtc", "instance_id": 0}], r"no footer followed by the section of 'rtc'"),
        (lambda d: [d[0], {**d[1], "instance_id": 1}], r"no footer followed by the section of 'cpu'"),
        (lambda d: [], r"expected the EOF byte \(the VM description lists no device\)"),
        (lambda d: [{"name": "x" * 300, "instance_id": 0}], "no section header can name"),
        (lambda d: [{"name": "timer", "instance_id": -1}], "does not list the device sections"),
        (lambda d: [{"name": "timer"}], "does not list the device sections"),
    ],
)
def test_device_sections_must_be_the_described_ones(edit, message: str) -> None:
    b = builder()
    b.devices()
    with pytest.raises(FormatError, match=message):
        parse(describe(b, edit(b.device_sections)))


def test_a_reused_section_id_is_refused() -> None:
    b = builder()
    b.device(3, "timer", bytes(8))
    b.device(3, "cpu", bytes(8))
    with pytest.raises(FormatError, match="reuses section id 3"):
        parse(b.finish())


@pytest.mark.parametrize("text", [b"{", b"[1, 2]", b'{"devices": 7}', b'{"devices": [1]}', b"\xff\xfe"])
def test_a_description_that_is_not_a_device_list_is_refused(text: bytes) -> None:
    b = builder()
    data = b.bytes() + b"\x00\x06" + struct.pack(">I", len(text)) + text
    with pytest.raises(FormatError, match=r"VM description at offset \d+ (is not valid JSON|does not list)"):
        parse(data)


def test_unknown_section_after_the_ram_is_named() -> None:
    b = builder()
    b.raw(b"\x42")
    with pytest.raises(FormatError, match=r"unknown section type 0x42 at offset \d+ after the RAM section"):
        parse(b.finish())


def test_a_section_past_the_eof_byte_is_refused() -> None:
    """RAM sections end at the EOF byte: one that runs into the description is cut."""
    b = StreamBuilder([("pc.ram", 2 * PAGE)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.ram", 0, pattern(0))
    with pytest.raises(FormatError, match="truncated"):
        parse(b.finish())


def test_open_refuses_a_cut_file(tmp_path: Path) -> None:
    b = builder()
    b.devices()
    data = b.finish()
    path = tmp_path / "cut.mem"
    path.write_bytes(data[: data.rindex(b"\x7e") + 5])
    with pytest.raises(FormatError, match=r"stream truncated or damaged at offset \d+"):
        QemuSource().open(path, kind="memory", options={})


# -- real captures ------------------------------------------------------------------------------

#: every capture's modified stream, and the RAM section id QEMU gave it
REAL = [
    "modified.mem",
    "variants/qemu-10.0-stream/modified.mem",
    "variants/qemu-10.0-mapped-ram/modified.mem",
    "variants/qemu-7.2-ignore-shared/modified.mem",
    "variants/qemu-10.0-ignore-shared/modified.mem",
]


@pytest.fixture(scope="module", params=REAL)
def real(request: pytest.FixtureRequest, fixture_set: Path):
    buf, closers = map_readonly(fixture_set / request.param)
    parsed = parse(buf)
    yield buf, parsed
    del buf
    for closer in closers:
        with contextlib.suppress(BufferError):
            closer.close()


def _ram_id(buf: np.ndarray, parsed: ParsedStream) -> int:
    """The RAM section's id: the footer right before the first device section names it."""
    return int.from_bytes(bytes(buf[parsed.devices_at - 4 : parsed.devices_at]), "big")


@pytest.mark.fixtures
def test_real_streams_end_with_a_description_of_their_device_sections(real) -> None:
    buf, parsed = real
    assert len(parsed.description.devices) == 34
    assert parsed.description.devices[-1] == ("globalstate", 0)
    assert parsed.description.page_size == PAGE
    assert buf[parsed.description.eof] == 0 and buf[parsed.description.eof + 1] == 0x06


@pytest.mark.fixtures
def test_real_cuts_after_zero_bytes_are_refused(real) -> None:
    """Cut after zero bytes of the device sections (a sample of 1500, the 64 before the EOF byte,
    and the 16 after every footer): refused as it is, and refused with its description put back
    (the EOF byte then is the zero byte the cut ends on)."""
    buf, parsed = real
    view = memoryview(buf)
    eof, start = parsed.description.eof, parsed.devices_at
    cuts = zero_cuts(view, start, eof)
    footers = np.flatnonzero(np.frombuffer(view[start:eof], np.uint8) == 0x7E) + start
    after_footers = {int(f) + k for f in footers for k in range(1, 17)}
    near = {c for c in cuts if c > eof - 64 or c in after_footers}
    sample = sorted(near | set(random.Random(7).sample(cuts, min(1500, len(cuts)))))
    ram_id = _ram_id(buf, parsed)
    for cut in sample:
        with pytest.raises(FormatError, match=REFUSED_END):
            find_description(view, cut, 8)
        with pytest.raises(FormatError):
            walk_devices(view, start, VmDescription(cut - 1, parsed.description.devices), {ram_id})


@pytest.mark.fixtures
def test_real_cuts_anywhere_are_refused(real) -> None:
    """Cuts across the whole file, from the header through RAM (for mapped-ram: block table,
    bitmap, page area) and device state into the description: each a FormatError."""
    buf, parsed = real
    size = int(buf.shape[0])
    eof = parsed.description.eof
    rng = random.Random(11)
    cuts = {1, 8, 9, 100, 4096, eof, eof + 1, eof + 2, eof + 6, eof + 7, size - 1}
    cuts |= {rng.randrange(size) for _ in range(40)} | {rng.randrange(eof - 70_000, size) for _ in range(40)}
    for cut in sorted(cuts):
        with pytest.raises(FormatError, match=rf"{REFUSED_END}|QEVM magic"):
            parse(buf[:cut])


@pytest.mark.fixtures
def test_real_device_sections_are_checked_against_the_description(real) -> None:
    buf, parsed = real
    view = memoryview(buf)
    devices = parsed.description.devices
    ram_id = _ram_id(buf, parsed)
    walk_devices(view, parsed.devices_at, parsed.description, {ram_id})
    for wrong in (devices[1:], devices[:-1], (devices[1], devices[0], *devices[2:])):
        with pytest.raises(FormatError):
            walk_devices(view, parsed.devices_at, VmDescription(parsed.description.eof, wrong), {ram_id})
