"""Any sequence of ZERO/PAGE records, sections and re-sends: the image is what QEMU would load,
and the stream comes back byte for byte."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu_helpers import rebuild
from qemu_stream_builder import PAGE, StreamBuilder, pattern
from vmdelta_source_qemu import QemuSource

BLOCKS = [("pc.ram", 6 * PAGE), ("vga.vram", 3 * PAGE), ("pc.bios", PAGE)]

record = st.tuples(
    st.integers(0, 2),  # block
    st.integers(0, 5),  # page (wrapped to the block)
    st.sampled_from(["page", "zero", "zero-page-data", "filled"]),
    st.integers(0, 250),  # content seed / fill byte
    st.booleans(),  # force a block name even when continuing
)


@settings(max_examples=60, deadline=None)
@given(sections=st.lists(st.lists(record, max_size=12), min_size=1, max_size=4))
def test_any_record_sequence_round_trips(sections: list[list[tuple[int, int, str, int, bool]]]) -> None:
    b = StreamBuilder(BLOCKS)
    b.start()
    b.eos_footer()
    offsets = np.cumsum([0] + [length for _, length in BLOCKS])
    model = np.zeros(int(offsets[-1]), np.uint8)
    for i, section in enumerate(sections):
        b.part(end=i == len(sections) - 1)
        for block, page, kind, seed, named in section:
            name, length = BLOCKS[block]
            page %= length // PAGE
            at = int(offsets[block]) + page * PAGE
            if kind == "page":
                b.page(name, page, pattern(seed), force_name=named)
                model[at : at + PAGE] = np.frombuffer(pattern(seed), np.uint8)
            elif kind == "zero-page-data":
                b.page(name, page, bytes(PAGE), force_name=named)
                model[at : at + PAGE] = 0
            else:
                fill = seed if kind == "filled" else 0
                b.zero(name, page, fill, force_name=named)
                model[at : at + PAGE] = fill
        b.eos_footer()
    b.devices()
    original = b.finish()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.mem"
        path.write_bytes(original)
        with QemuSource().open(path, kind="memory", options={}) as image:
            assert np.array_equal(image.data, model)
            for start, length in image.holes.tolist():
                assert not model[start : start + length].any()
            assert rebuild(image, Path(tmp)).read_bytes() == original
