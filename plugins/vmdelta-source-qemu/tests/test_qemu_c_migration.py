"""The declarative schemas, and the fast record path held to them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from qemu_stream_builder import PAGE, StreamBuilder, pattern, simple_stream
from vmdelta_source_qemu import c_migration as c
from vmdelta_source_qemu.scan import KIND_PAGE, KIND_ZERO
from vmdelta_source_qemu.stream import parse_stream


def records_by_construct(data: bytes, start: int, stop: int) -> list[tuple[int, int, int, str | None, int | None]]:
    """Every record between ``start`` and ``stop`` read with :data:`RAM_RECORD`: (pos, offset, flags, name, fill)."""
    f = io.BytesIO(data)
    f.seek(start)
    out = []
    while f.tell() < stop:
        pos = f.tell()
        rec = c.RAM_RECORD.parse_stream(f)
        out.append((pos, rec.offset, rec.flags, rec.name, rec.fill))
    return out


def test_scanner_agrees_with_the_schema_on_every_record() -> None:
    b = StreamBuilder([("pc.ram", 64 * PAGE), ("pc.bios", 4 * PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    start = len(b.bytes())
    rng = np.random.default_rng(1)
    for page, kind in enumerate(rng.integers(0, 2, 64).tolist()):
        if kind:
            b.page("pc.ram", page, pattern(page))
        else:
            b.zero("pc.ram", page)
    for page in range(4):
        b.page("pc.bios", page, pattern(page))
    stop = len(b.bytes())
    b.eos_footer()
    b.part(end=True)
    b.eos_footer()
    b.devices()
    data = b.finish()
    parsed = parse_stream(np.frombuffer(data, np.uint8))
    parsed.image.close()
    t = parsed.table
    expected = records_by_construct(data, start, stop)
    assert len(t) == len(expected) == 68
    names = [blk.name for blk in parsed.blocks]
    for i, (pos, offset, flags, name, fill) in enumerate(expected):
        assert t.pos[i] == pos
        assert t.page[i] * PAGE == offset
        assert t.kind[i] == (KIND_PAGE if flags & c.RamFlag.PAGE else KIND_ZERO)
        assert bool(t.named[i]) == (name is not None)
        if name is not None:
            assert names[t.block[i]] == name
        assert t.fill[i] == (fill or 0)


def test_schemas_round_trip_real_headers(fixture_set: Path) -> None:
    for path in (
        fixture_set / "base.mem",
        fixture_set / "variants/qemu-10.0-mapped-ram/base.mem",
        fixture_set / "variants/qemu-7.2-ignore-shared/base.mem",
    ):
        with open(path, "rb") as fh:
            head = fh.read(4096)
        f = io.BytesIO(head)
        header = c.FILE_HEADER.parse_stream(f)
        assert header.version == c.STREAM_VERSION
        at = f.tell()
        config = c.CONFIGURATION.parse_stream(f)
        assert config.machine.startswith("pc-i440fx-")
        assert c.CONFIGURATION.build(config) == head[at : f.tell()]
        caps: list[str] = []
        if head[f.tell()] == c.SectionType.SUBSECTION:
            c.SUBSECTION_HEADER.parse_stream(f)
            at = f.tell()
            caps = list(c.CAPABILITIES.parse_stream(f))
            assert c.CAPABILITIES.build(caps) == head[at : f.tell()]
        at = f.tell()
        section = c.SECTION_FULL.parse_stream(f)
        assert (section.idstr, section.version_id) == ("ram", 4)
        assert c.SECTION_FULL.build(section) == head[at : f.tell()]
        f.read(8)  # MEM_SIZE
        entry = c.block_entry(guest_address="x-ignore-shared" in caps, mapped_ram="mapped-ram" in caps)
        at = f.tell()
        first = entry.parse_stream(f)
        assert first.name == "pc.ram" and first.used_length == 128 << 20
        assert entry.build(first) == head[at : f.tell()]


def test_command_and_footer_schemas() -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.command(11)
    raw = b.bytes()[-5:]
    cmd = c.COMMAND.parse(raw)
    assert (cmd.command, cmd.data) == (11, b"")
    assert c.COMMAND.build(cmd) == raw
    assert c.FOOTER.build({"section_id": 2}) == b"\x7e\x00\x00\x00\x02"


def test_simple_stream_parses_with_every_section_kind() -> None:
    parsed = parse_stream(np.frombuffer(simple_stream(), np.uint8))
    parsed.image.close()
    assert parsed.fmt == "stream" and parsed.machine == "pc-i440fx-7.2"
    assert parsed.rewritten
    assert parsed.description.page_size == PAGE
    assert parsed.description.devices == (("timer", 0), ("cpu", 0))


def test_scanner_agrees_with_the_schema_on_a_real_stream(fixture_set: Path) -> None:
    from vmdelta_core.plugin import map_readonly

    buf, closers = map_readonly(fixture_set / "variants/qemu-10.0-stream/modified.mem")
    try:
        parsed = parse_stream(buf)
        parsed.image.close()
        t = parsed.table
        # the first 3000 records after the first block name, each read on its own with construct
        first = int(np.flatnonzero(t.named)[0])
        count = 3000
        data = bytes(buf[int(t.pos[first]) : int(t.end[first + count - 1])])
        expected = records_by_construct(data, 0, len(data))
        assert len(expected) == count
        names = [blk.name for blk in parsed.blocks]
        for k, (pos, offset, flags, name, fill) in enumerate(expected):
            i = first + k
            assert t.pos[i] - t.pos[first] == pos
            assert t.page[i] * PAGE == offset
            assert t.kind[i] == (KIND_PAGE if flags & c.RamFlag.PAGE else KIND_ZERO)
            assert name is None or names[t.block[i]] == name
            assert t.fill[i] == (fill or 0)
        assert set(t.kind[first : first + count].tolist()) == {KIND_PAGE, KIND_ZERO}
        del parsed, t
    finally:
        del buf
        for closer in closers:
            closer.close()  # type: ignore[attr-defined]
