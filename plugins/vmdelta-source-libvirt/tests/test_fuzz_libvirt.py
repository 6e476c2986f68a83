"""The fuzz contract (:mod:`vmdelta_core.fuzzing`) over the save image reader and the envelope
reader of ``apply``: a save image around a real QEMU stream, raw or gzip-compressed, with bytes
changed, inserted or cut in its header and XML, at the start of its stream, or anywhere; an
envelope with the same done to it. Each gives a correct result or one clean
:class:`VmdeltaError`, within the contract's time and memory bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from libvirt_helpers import save_image
from vmdelta_source_libvirt import LibvirtSource

from vmdelta_core.plugin import RebuiltImage, SourceImage
from vmdelta_core.testing import check_untrusted, fuzz_settings

edits = st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(0, 255)), max_size=6)
inserts = st.lists(st.tuples(st.integers(0, 1 << 32), st.binary(min_size=1, max_size=12)), max_size=2)
cuts = st.none() | st.integers(0, 1 << 32)


def mutate(data: bytes, where: tuple[int, int], edits: list, inserts: list, cut: int | None) -> bytes:
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


@pytest.fixture(scope="module")
def images(stream: bytes) -> dict[str, bytes]:
    return {fmt: save_image(stream, fmt) for fmt in ("raw", "gzip")}


@fuzz_settings(80)
@given(
    fmt=st.sampled_from(["raw", "gzip"]),
    region=st.sampled_from(["header", "xml", "stream", "anywhere"]),
    edits=edits,
    inserts=inserts,
    cut=cuts,
)
def test_fuzz_save_image(
    tmp_path: Path, images: dict[str, bytes], fmt: str, region: str, edits: list, inserts: list, cut: int | None
) -> None:
    data = images[fmt]
    start = 92 + int.from_bytes(data[20:24], "little")
    where = {"header": (0, 92), "xml": (92, 600), "stream": (start, start + 200), "anywhere": (0, len(data))}[region]
    path = tmp_path / "fuzz.sav"
    path.write_bytes(mutate(data, where, edits, inserts, cut))
    result = check_untrusted("libvirt save image", lambda: LibvirtSource().open(path, kind="memory", options={}))
    if not isinstance(result, SourceImage):
        assert "\n" not in str(result)
        return
    with result as image:
        for hole, length in image.holes.tolist():
            assert not image.data[hole : hole + length].any()


@fuzz_settings(80)
@given(
    region=st.sampled_from(["lengths", "header", "stream"]),
    edits=edits,
    inserts=inserts,
    cut=cuts,
)
def test_fuzz_envelope(
    tmp_path: Path, images: dict[str, bytes], region: str, edits: list, inserts: list, cut: int | None
) -> None:
    path = tmp_path / "good.sav"
    path.write_bytes(images["raw"])
    with LibvirtSource().open(path, kind="memory", options={}) as image:
        envelope = image.envelope
        raw = tmp_path / "image.raw"
        raw.write_bytes(image.data.tobytes())
        size, layout = image.size, image.layout
    prefix = int.from_bytes(envelope[8:12], "big")
    where = {"lengths": (8, 12), "header": (12, 12 + 92), "stream": (16 + prefix, len(envelope))}[region]
    rebuilt = RebuiltImage(
        path=raw,
        size=size,
        unit_size=4096,
        envelope=mutate(envelope, where, edits, inserts, cut),
        layout=layout,
        changed=np.zeros(0, np.int64),
        base=None,  # type: ignore[arg-type]
        base_path=raw,
    )
    out = tmp_path / "out.sav"
    result = check_untrusted("libvirt envelope", lambda: LibvirtSource().materialize(rebuilt, out))
    if result is not None:
        assert "\n" not in str(result)
    else:
        # whatever was accepted is at most the envelope's bytes and the image's records
        assert out.stat().st_size <= len(rebuilt.envelope) + 2 * size
