"""apply reads a stream's frames ahead, in a thread of its own, while it checks the bases and
applies earlier frames: the sender is not kept waiting, the frames come in order, and a cut or
damaged stream is refused in its place, after the frames before the damage."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from samples import sample_pair, write_pair

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.apply.feed import ReadAhead
from vmdelta_core.errors import FormatError, IntegrityError
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.convert import convert_overlay
from vmdelta_core.overlay.stream import StreamReader
from vmdelta_core.testing import registry_with

UNIT = 4096


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A stream-form overlay of a disk with 80 units of new random data: several frames, and
    far more than a pipe holds."""
    folder = tmp_path_factory.mktemp("read-ahead")
    base, modified = sample_pair(seed=5, units=96)
    modified[8 * UNIT : 88 * UNIT] = np.random.default_rng(5).integers(0, 256, 80 * UNIT, dtype=np.uint8)
    base_path, modified_path = write_pair(folder, "disk", base, modified)
    overlay = folder / "o.vmdo"
    config = CreateConfig(
        overlay, [ImageSpec("disk", base_path, modified_path)], frame_size=65536, cache_dir=folder / "c"
    )
    create_overlay(config, registry=registry_with())
    out = io.BytesIO()
    with OverlayReader(Path(overlay)) as reader:
        convert_overlay(reader, out, stream=True)
    return out.getvalue()


def frames_of(data: bytes) -> list:
    reader = StreamReader(io.BytesIO(data), "stream")
    return list(iter(reader.next_frame, None))


def test_the_sender_is_not_kept_waiting_while_no_frame_is_asked_for(stream: bytes) -> None:
    r, w = os.pipe()
    sent = threading.Event()

    def send() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(stream)
        sent.set()

    threading.Thread(target=send, daemon=True).start()
    with os.fdopen(r, "rb") as pipe:
        ahead = ReadAhead(StreamReader(pipe, "stream"), budget=len(stream))
        # without reading ahead the sender would block for ever on the full pipe
        assert sent.wait(60), "the sender was kept waiting"
        frames = list(iter(ahead.next, None))
    assert len(frames) > 3
    assert frames == frames_of(stream)


@pytest.mark.parametrize("budget", [1, 1 << 20])
def test_a_cut_stream_is_refused_after_the_frames_before_the_cut(stream: bytes, budget: int) -> None:
    whole = frames_of(stream)
    cut = whole[2][0].file_offset + 10  # inside the third frame
    ahead = ReadAhead(StreamReader(io.BytesIO(stream[:cut]), "stream"), budget=budget)
    assert [ahead.next(), ahead.next()] == whole[:2]
    for _ in range(2):  # and again, should it be asked twice
        with pytest.raises(FormatError, match="cut short"):
            ahead.next()


def test_a_damaged_frame_is_refused_in_its_place(stream: bytes) -> None:
    whole = frames_of(stream)
    damaged = bytearray(stream)
    damaged[whole[1][0].file_offset + 5] ^= 0x40
    ahead = ReadAhead(StreamReader(io.BytesIO(bytes(damaged)), "stream"), budget=1 << 20)
    assert ahead.next() == whole[0]
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        ahead.next()
