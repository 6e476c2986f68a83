"""Damaged and unsupported inputs: each ends in one FormatError (or ConfigError) that says why."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from qemu_helpers import rebuild
from qemu_stream_builder import (
    COMPRESS,
    FLUSH,
    HOOK,
    PAGE,
    XBZRLE,
    StreamBuilder,
    be64,
    pattern,
    simple_stream,
)
from vmdelta_source_qemu import QemuSource
from vmdelta_source_qemu.envelope import Envelope

from vmdelta_core.plugin import ConfigError, FormatError


def open_bytes(tmp_path: Path, data: bytes, **options: str):
    path = tmp_path / "bad.mem"
    path.write_bytes(data)
    return QemuSource().open(path, kind="memory", options=options)


def stream_with(record: bytes) -> bytes:
    b = StreamBuilder([("pc.ram", 4 * PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    b.page("pc.ram", 0, pattern(0))
    b.raw(record)
    b.eos_footer()
    b.part(end=True)
    b.eos_footer()
    b.devices()
    return b.finish()


@pytest.mark.parametrize(
    ("flags", "capability"),
    [(XBZRLE, "xbzrle"), (COMPRESS, "compress"), (HOOK, "rdma")],
)
def test_refused_records_name_the_capability(tmp_path: Path, flags: int, capability: str) -> None:
    data = stream_with(be64(PAGE | flags | 0x20) + bytes(64))
    with pytest.raises(FormatError, match=f"offset \\d+: .*turn off the {capability}|offset \\d+: .*not {capability}"):
        open_bytes(tmp_path, data)


def test_multifd_flush_is_refused_naming_multifd(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="multifd capability off"):
        open_bytes(tmp_path, stream_with(be64(FLUSH)))


def test_unknown_record_flags(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="unknown flags 0x401"):
        open_bytes(tmp_path, stream_with(be64(0x401)))


def test_version_other_than_3(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"version 2 .*only version 3"):
        open_bytes(tmp_path, simple_stream(version=2))


def test_not_a_stream(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="QEVM magic"):
        open_bytes(tmp_path, b"\x7fELF" + bytes(100))


def test_unknown_section_type(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start()
    b.eos_footer()
    b.raw(b"\x09" + bytes(20))
    with pytest.raises(FormatError, match="unknown section type 0x09 at offset"):
        open_bytes(tmp_path, b.finish())


def test_unknown_section_type_after_ram(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.eos_footer()
    b.raw(b"\x42")
    with pytest.raises(FormatError, match="unknown section type 0x42"):
        open_bytes(tmp_path, b.finish())


def test_other_iterative_section_is_refused(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start(section_id=5, idstr="dirty-bitmap", version=1)
    with pytest.raises(FormatError, match="iterative section 'dirty-bitmap'"):
        open_bytes(tmp_path, b.finish())


@pytest.mark.parametrize(
    ("total", "message"),
    [
        (3 * PAGE, "does not add up: blocks hold 16384 bytes, the header says 12288"),
        (5 * PAGE, "does not add up: blocks hold 20606 bytes, the header says 20480"),
    ],
)
def test_block_table_that_does_not_add_up(tmp_path: Path, total: int, message: str) -> None:
    b = StreamBuilder([("pc.ram", 2 * PAGE), ("pc.bios", 2 * PAGE)])
    b.start(total=total)
    b.eos_footer()
    with pytest.raises(FormatError, match=message):
        open_bytes(tmp_path, b.finish())


def test_block_table_odd_length(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE + 512), ("pc.bios", PAGE - 512)])
    b.start()
    b.eos_footer()
    with pytest.raises(FormatError, match="not a multiple of 4096"):
        open_bytes(tmp_path, b.finish())


def test_record_for_unknown_block_or_beyond_its_end(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    b.page("vga.vram", 0, pattern(0))
    with pytest.raises(FormatError, match=r"'vga\.vram', which is not in the block table"):
        open_bytes(tmp_path, b.finish())
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    b.page("pc.ram", 1, pattern(0))
    with pytest.raises(FormatError, match=r"beyond block 'pc\.ram'"):
        open_bytes(tmp_path, b.finish())


def test_continue_without_a_block(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    b.raw(be64(0x28) + pattern(0))
    with pytest.raises(FormatError, match="no block was named"):
        open_bytes(tmp_path, b.finish())


def test_unknown_capability(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)], capabilities=["x-magic"])
    b.start()
    with pytest.raises(FormatError, match=r"'x-magic'.*save with it off"):
        open_bytes(tmp_path, b.finish())


def test_wrong_footer(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start()
    b.raw(be64(0x10) + b"\x7e" + struct.pack(">I", 9))
    with pytest.raises(FormatError, match=r"footer .* names section 9"):
        open_bytes(tmp_path, b.finish())


def test_device_section_before_ram_end(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", PAGE)])
    b.start()
    b.eos_footer()
    b.devices()
    with pytest.raises(FormatError, match="before the RAM section ended"):
        open_bytes(tmp_path, b.finish())


def test_every_truncation_is_a_format_error(tmp_path: Path) -> None:
    """Cut the stream anywhere before its end: always one FormatError, never another exception."""
    original = simple_stream()
    cuts = sorted(set(range(0, 400, 3)) | set(range(400, len(original), 97)) | {len(original) - 1})
    for cut in cuts:
        with pytest.raises(FormatError, match=r"truncated|QEVM magic|does not end"):
            open_bytes(tmp_path, original[:cut])


def test_ignore_shared_without_ram_file_names_the_option(tmp_path: Path) -> None:
    b = StreamBuilder(
        [("pc.ram", 2 * PAGE), ("pc.bios", PAGE)], capabilities=["x-ignore-shared"], addresses=[0, 0xFFFC0000]
    )
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.bios", 0, pattern(3))
    b.eos_footer()
    b.devices()
    data = b.finish()
    with pytest.raises(ConfigError, match="--memory-ram"):
        open_bytes(tmp_path, data)
    ram = tmp_path / "ram.raw"
    ram.write_bytes(bytes(3 * PAGE))
    with pytest.raises(ConfigError, match=r"is 12288 bytes, but block 'pc\.ram' is 8192"):
        open_bytes(tmp_path, data, ram=str(ram))


def test_ram_file_for_a_stream_without_ignore_shared(tmp_path: Path) -> None:
    ram = tmp_path / "ram.raw"
    ram.write_bytes(bytes(PAGE))
    with pytest.raises(ConfigError, match="not saved with x-ignore-shared"):
        open_bytes(tmp_path, simple_stream(), ram=str(ram))


def test_damaged_envelope(tmp_path: Path) -> None:
    image = open_bytes(tmp_path, simple_stream())
    for broken in (
        b"",
        image.envelope[:5],
        b"QEMUENV1" + bytes(3),
        image.envelope[:-40],
        image.envelope[:30] + b"\x09" + image.envelope[31:],
    ):
        with pytest.raises(FormatError):
            Envelope.from_bytes(broken)


def test_ignore_shared_apply_without_ram_output_names_the_option(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", 2 * PAGE), ("pc.bios", PAGE)], capabilities=["x-ignore-shared"], addresses=[0, 0])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.bios", 0, pattern(3))
    b.eos_footer()
    b.devices()
    ram = tmp_path / "ram.raw"
    ram.write_bytes(pattern(1) + bytes(PAGE))
    image = open_bytes(tmp_path, b.finish(), ram=str(ram))
    assert bytes(image.data[:PAGE]) == pattern(1)
    with pytest.raises(ConfigError, match="--memory-ram"):
        rebuild(image, tmp_path)
    out_ram = tmp_path / "out-ram.raw"
    out = rebuild(image, tmp_path, {"ram": out_ram})
    assert out.read_bytes() == (tmp_path / "bad.mem").read_bytes()
    assert out_ram.read_bytes() == ram.read_bytes()
