"""Streams of known shape: what the image holds, and that they come back byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qemu_helpers import rebuild
from qemu_stream_builder import PAGE, StreamBuilder, pattern, simple_stream
from vmdelta_source_qemu import QemuSource
from vmdelta_source_qemu.envelope import Envelope, Run

from vmdelta_core.testing import check_source


def open_stream(tmp_path: Path, data: bytes, **options: str):
    path = tmp_path / "s.mem"
    path.write_bytes(data)
    return QemuSource().open(path, kind="memory", options=options)


def test_image_holds_the_last_write_of_every_page(tmp_path: Path) -> None:
    image = open_stream(tmp_path, simple_stream())
    data = image.data
    assert image.size == 10 * PAGE
    assert bytes(data[0:PAGE]) == pattern(0)
    assert bytes(data[PAGE : 2 * PAGE]) == pattern(11)  # re-sent in the END section
    assert not data[2 * PAGE : 4 * PAGE].any()
    assert bytes(data[9 * PAGE : 10 * PAGE]) == pattern(9)  # vga.vram page 1, after pc.ram's 8 pages
    assert image.layout["format"] == "stream"
    assert [b["name"] for b in image.layout["blocks"]] == ["pc.ram", "vga.vram"]
    assert image.layout["blocks"][1]["offset"] == 8 * PAGE
    assert image.layout["blocks"][0]["guest_address"] == 0
    assert image.layout["blocks"][1]["guest_address"] is None
    # zero pages are holes: pc.ram 2,3,5,7 and vga.vram 0
    assert image.holes.tolist() == [[2 * PAGE, 2 * PAGE], [5 * PAGE, PAGE], [7 * PAGE, 2 * PAGE]]
    assert not data.flags.writeable


def test_stream_rebuilds_byte_for_byte(tmp_path: Path) -> None:
    original = simple_stream()
    (tmp_path / "s.mem").write_bytes(original)
    image = check_source(QemuSource(), tmp_path / "s.mem", "memory")
    assert image.exact_artifact
    # the superseded first copy of page 1 is kept verbatim, the rest are runs
    env = Envelope.from_bytes(image.envelope)
    assert any(isinstance(op, bytes) and pattern(1) in op for op in env.ops)
    assert sum(isinstance(op, Run) for op in env.ops) >= 3


def test_zero_data_page_and_filled_zero_record_rebuild_exactly(tmp_path: Path) -> None:
    b = StreamBuilder([("pc.ram", 4 * PAGE)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.ram", 0, bytes(PAGE))  # a PAGE record of zeros (zero-page-detection=none)
    b.zero("pc.ram", 1, fill=0x5A)  # QEMU fills the page with this byte
    b.page("pc.ram", 2, pattern(2))
    b.zero("pc.ram", 3)
    b.eos_footer()
    b.devices()
    original = b.finish()
    image = open_stream(tmp_path, original)
    assert bytes(image.data[PAGE : 2 * PAGE]) == b"\x5a" * PAGE
    assert image.holes.tolist() == [[3 * PAGE, PAGE]]
    assert rebuild(image, tmp_path).read_bytes() == original


def test_changed_image_writes_a_stream_of_the_new_pages(tmp_path: Path) -> None:
    """A lossy rebuild (a page dropped by a filter) still loads exactly the rebuilt RAM."""
    image = open_stream(tmp_path, simple_stream())
    data = image.data.copy()
    data[3 * PAGE : 4 * PAGE] = 7  # was a ZERO page
    data[4 * PAGE : 5 * PAGE] = 0  # was a PAGE
    out = rebuild(image, tmp_path, data=data)
    again = QemuSource().open(out, kind="memory", options={})
    assert np.array_equal(again.data, data)
    assert again.envelope == image.envelope


@pytest.mark.parametrize("pages", [1, 2, 3, 700])
def test_long_runs_of_mixed_records(tmp_path: Path, pages: int) -> None:
    rng = np.random.default_rng(pages)
    b = StreamBuilder([("pc.ram", pages * PAGE), ("pc.bios", PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    kinds = rng.integers(0, 3, pages)
    expected = np.zeros(pages * PAGE + PAGE, np.uint8)
    for page, kind in enumerate(kinds.tolist()):
        if kind:
            b.page("pc.ram", page, pattern(page))
            expected[page * PAGE : (page + 1) * PAGE] = np.frombuffer(pattern(page), np.uint8)
        else:
            b.zero("pc.ram", page)
    b.page("pc.bios", 0, pattern(99))
    expected[pages * PAGE :] = np.frombuffer(pattern(99), np.uint8)
    b.eos_footer()
    b.part(end=True)
    b.eos_footer()
    b.devices()
    original = b.finish()
    image = open_stream(tmp_path, original)
    assert np.array_equal(image.data, expected)
    assert rebuild(image, tmp_path).read_bytes() == original


def test_long_stretches_go_to_a_file_map_in_tmpdir(tmp_path: Path) -> None:
    """Stretches longer than a write chunk, re-sent pages, a ZERO record over a written page, a
    filled ZERO record and an all-zero PAGE record, in an image file under ``tmpdir``."""
    pages = 2600
    expected = np.zeros((pages, PAGE), np.uint8)
    b = StreamBuilder([("pc.ram", pages * PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    for page in range(pages):
        if page % 700 == 5:
            b.zero("pc.ram", page)
        else:
            expected[page] = np.frombuffer(pattern(page), np.uint8)
            b.page("pc.ram", page, pattern(page))
    b.eos_footer()
    b.part(end=True)
    b.zero("pc.ram", 1030)  # a page that had data becomes zero
    expected[1030] = 0
    b.zero("pc.ram", 1031, fill=7)
    expected[1031] = 7
    b.page("pc.ram", 2000, bytes(PAGE))  # zero-page detection off: sent as PAGE
    expected[2000] = 0
    b.eos_footer()
    b.devices()
    original = b.finish()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with open_stream(tmp_path, original, tmpdir=str(scratch)) as image:
        assert image.mapping is not None
        assert not list(scratch.iterdir())  # the image file is unlinked
        assert np.array_equal(image.data.reshape(pages, PAGE), expected)
        image.release(0, image.size)  # pages come back from the file when read again
        assert np.array_equal(image.data.reshape(pages, PAGE), expected)
        assert rebuild(image, tmp_path).read_bytes() == original
