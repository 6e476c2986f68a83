"""Hostile or damaged layouts and envelopes at apply time: a FormatError or a sound disk.

The layout (and an envelope, which a disk never has) reach ``materialize`` from the overlay, so
they are untrusted even when every checksum holds: a cluster size is an allocation size.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from vmdelta_source_disk import Qcow2Source, RawSource, write_qcow2

from vmdelta_core.plugin import FormatError, RebuiltImage, SourceImage
from vmdelta_core.testing import TRAILER, TRAILER_SIZE, main, rewrite_overlay

UNIT = 4096
SIZE = 64 * UNIT


def disk(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = np.zeros(SIZE, np.uint8)
    for unit in (0, 3, 4, 17, 40, 63):
        data[unit * UNIT : (unit + 1) * UNIT] = rng.integers(0, 256, UNIT, dtype=np.uint8)
    return data.tobytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile-disk")
    (d / "base.img").write_bytes(disk(1))
    modified = disk(2)
    (d / "modified.img").write_bytes(modified)
    (d / "raw-modified").write_bytes(modified)
    write_qcow2(d / "modified.qcow2", d / "raw-modified", np.arange(SIZE // (1 << 16)), size=SIZE)
    return d


@pytest.fixture(scope="module")
def qcow2_layout(folder: Path) -> dict[str, Any]:
    with Qcow2Source().open(folder / "modified.qcow2", kind="disk", options={}) as image:
        return dict(image.layout)


def materialize(folder: Path, source: str, layout: Any, envelope: bytes, options: dict[str, Any]) -> list[str] | None:
    """Materialize the modified disk with ``layout``: the files written, or None when refused."""
    base: SourceImage = RawSource().open(folder / "base.img", kind="disk", options={})
    with base, tempfile.TemporaryDirectory(dir=folder) as work:
        rebuilt_path = Path(work) / "rebuilt"
        rebuilt_path.write_bytes((folder / "modified.img").read_bytes())
        rebuilt = RebuiltImage(
            path=rebuilt_path,
            size=SIZE,
            unit_size=UNIT,
            envelope=envelope,
            layout=layout,
            changed=np.arange(SIZE // UNIT, dtype=np.int64),
            base=base,
            base_path=folder / "base.img",
            options=options,
        )
        component = Qcow2Source() if source == "qcow2" else RawSource()
        try:
            component.materialize(rebuilt, Path(work) / "out")
        except FormatError as exc:
            assert "\n" not in str(exc)
            return None
        written = sorted(p.name for p in Path(work).iterdir())
        assert set(written) <= {"out", "rebuilt"}, written
        # the disk, plus at most a handful of 2 MiB metadata clusters of a qcow2
        assert (Path(work) / "out").stat().st_size <= SIZE + 8 * (2 << 20)
        return written


scalars = st.one_of(
    st.integers(-(1 << 66), 1 << 66),
    st.integers(-2, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 9), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(
    source=st.sampled_from(["qcow2", "raw"]),
    start=st.sampled_from(["qcow2", "raw", "empty"]),
    edits=st.dictionaries(
        st.sampled_from(["version", "cluster_bits", "backing_file", "format", "compression"]), scalars
    ),
    envelope=st.just(b"") | st.binary(max_size=16),
    output=st.sampled_from([{}, {"output_format": "qcow2"}, {"output_format": "raw"}]),
)
def test_hostile_layouts(
    folder: Path, qcow2_layout: dict, source: str, start: str, edits: dict, envelope: bytes, output: dict
) -> None:
    layout = {"qcow2": qcow2_layout, "raw": {"format": "raw"}, "empty": {}}[start]
    materialize(folder, source, {**layout, **edits}, envelope, output)


def test_a_real_layout_round_trips(folder: Path, qcow2_layout: dict) -> None:
    assert materialize(folder, "qcow2", qcow2_layout, b"", {}) is not None


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"cluster_bits": 1 << 40}, "cluster_bits 1099511627776 is not between 9 and 21"),
        ({"cluster_bits": float("inf")}, "cluster_bits inf"),
        ({"cluster_bits": True}, "cluster_bits True"),
        ({"version": "3"}, "version '3' is not 2 or 3"),
        ({"backing_file": 7}, "backing_file 7"),
    ],
)
def test_layout_fields_are_checked_before_use(folder: Path, qcow2_layout: dict, edit: dict, match: str) -> None:
    base = RawSource().open(folder / "base.img", kind="disk", options={})
    rebuilt = RebuiltImage(folder / "x", SIZE, UNIT, b"", {**qcow2_layout, **edit}, np.zeros(0, np.int64), base, folder)
    with base, pytest.raises(FormatError, match=match):
        Qcow2Source().materialize(rebuilt, folder / "never-written")
    assert not (folder / "never-written").exists()


def test_an_envelope_for_a_disk_is_refused(folder: Path) -> None:
    base = RawSource().open(folder / "base.img", kind="disk", options={})
    rebuilt = RebuiltImage(folder / "x", SIZE, UNIT, b"QEMUENV1", {}, np.zeros(0, np.int64), base, folder)
    with base, pytest.raises(FormatError, match="8-byte envelope for a raw disk"):
        RawSource().materialize(rebuilt, folder / "never-written")


def test_a_cluster_size_option_that_is_not_a_number_is_a_config_error(folder: Path) -> None:
    from vmdelta_core.plugin import ConfigError

    base = RawSource().open(folder / "base.img", kind="disk", options={})
    options = {"output_format": "qcow2", "qcow2_cluster_size": "64k"}
    rebuilt = RebuiltImage(folder / "x", SIZE, UNIT, b"", {}, np.zeros(0, np.int64), base, folder, options)
    with base, pytest.raises(ConfigError, match="'64k' is not a number"):
        RawSource().materialize(rebuilt, folder / "never-written")


# ------------------------------------------------------------------------------------------------
# end to end: a damaged but resealed overlay through ``vmdelta apply``
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modified", ["modified.img", "modified.qcow2"])
def test_damaged_resealed_overlays_through_the_cli(
    folder: Path,
    modified: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMDELTA_DEBUG", raising=False)
    overlay = tmp_path / "vm.overlay"
    assert main(["create", "-q", "-o", str(overlay), "--disk", str(folder / "base.img"), str(folder / modified)]) == 0
    data = overlay.read_bytes()
    overlay.unlink()
    trailer = TRAILER.parse(data[-TRAILER_SIZE:])
    metadata = json.loads(data[trailer.metadata_offset : trailer.metadata_offset + trailer.metadata_length])
    layout_text = json.dumps(metadata["images"][0]["layout"]).encode()
    rng = random.Random(modified)
    out = tmp_path / "out.img"
    outcomes: dict[int, int] = {}
    for round_ in range(30):
        if round_ % 3 == 0:  # an envelope frame a disk never has
            junk = rng.randbytes(rng.randrange(1, 64))
            damaged = rewrite_overlay(data, envelope=(0, zstandard.ZstdCompressor().compress(junk), len(junk)))
        else:  # bits of the layout as the metadata spells it, where they still make a JSON object
            damaged_meta = json.loads(json.dumps(metadata))
            for _ in range(100):
                trial = bytearray(layout_text)
                for _ in range(rng.choice([1, 2])):
                    trial[rng.randrange(len(trial))] ^= 1 << rng.randrange(7)
                try:
                    layout = json.loads(trial)
                except ValueError:
                    continue
                if isinstance(layout, dict):
                    damaged_meta["images"][0]["layout"] = layout
                    break
            damaged = rewrite_overlay(data, metadata=damaged_meta)
        (tmp_path / "damaged.overlay").write_bytes(damaged)
        args = ["apply", "-q", str(tmp_path / "damaged.overlay"), "--disk", str(folder / "base.img"), str(out)]
        code = main(args + (["--disk-format", "qcow2"] if round_ % 2 else []))
        err = capsys.readouterr().err
        outcomes[code] = outcomes.get(code, 0) + 1
        if code:
            assert err.startswith("vmdelta: error: ") and err.count("\n") == 1, err
            assert not out.exists()
        else:
            assert out.stat().st_size <= SIZE + 8 * (2 << 20)
            out.unlink()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "damaged.overlay"]
    assert outcomes.get(3, 0) > 0, outcomes
