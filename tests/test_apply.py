"""apply, stage by stage: the components and bases it trusts, the frames it refuses, the rebuilt
image it checks, the files it puts in place (side files too) and only together."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from samples import sample_pair, write_pair

from vmdelta_core import Filter, FilterContext, FilterResult, RebuiltImage, Source, SourceImage, hookimpl
from vmdelta_core.api import (
    ApplyConfig,
    ApplyImageSpec,
    CreateConfig,
    FilterSpec,
    ImageSpec,
    apply_overlay,
    create_overlay,
)
from vmdelta_core.apply.bases import Decoders
from vmdelta_core.apply.rebuild import verify_rebuilt
from vmdelta_core.apply.synthesis import Targets
from vmdelta_core.components import SideFile
from vmdelta_core.errors import BaseMismatchError, ConfigError, FormatError, IntegrityError, PluginError
from vmdelta_core.fileio import open_file_image
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.container import OverlayReader, OverlayWriter
from vmdelta_core.overlay.metadata import ComponentRecord, OverlayMetadata
from vmdelta_core.overlay.schema import ItemType, Ref
from vmdelta_core.records import NullProgress
from vmdelta_core.testing import registry_with

UNIT = 4096


class Noted(Source):
    """A raw image with a note beside it: the note is read at open (the envelope) and written
    back at materialize; ``fail`` makes materialize give up once it has written everything."""

    name = "noted"
    side_files = (SideFile("note", "a few bytes kept beside the image"),)
    fail = False

    def open(self, path: Path, *, kind: Any, options: Mapping[str, Any]) -> SourceImage:
        note = Path(options["note"]).read_bytes() if "note" in options else b""
        return open_file_image(path, kind, envelope=note)

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        rebuilt.move_to(output)
        if "note" in rebuilt.side_outputs:
            Path(rebuilt.side_outputs["note"]).write_bytes(rebuilt.envelope)
        if self.fail:
            raise PluginError("noted: gave up after writing")


class MemFile(Noted):
    name = "memfile"
    kinds = frozenset({"memory"})


class DropAll(Filter):
    name = "dropall"

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        return FilterResult(np.ones(candidates.shape, dtype=bool), "in-test: every unit is free")


class Components:
    @hookimpl
    def vmdelta_register_sources(self, register) -> None:
        register(Noted())
        register(MemFile())

    @hookimpl
    def vmdelta_register_filters(self, register) -> None:
        register(DropAll())


REGISTRY = registry_with(Components())


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A disk pair and its overlay (no compression, so frames can be crafted): base, modified, overlay."""
    base, modified = write_pair(tmp_path, "disk", *sample_pair(seed=6, units=24))
    overlay = tmp_path / "o.vmdo"
    config = CreateConfig(overlay, [ImageSpec("disk", base, modified)], codec="none", cache_dir=tmp_path / "c")
    create_overlay(config, registry=REGISTRY)
    return base, modified, overlay


def apply(overlay: Path, base: Path, output: Path, *, strict: bool = False, **spec: Any) -> Any:
    image = ApplyImageSpec("disk", base, output, **spec)
    config = ApplyConfig(overlay, [image], strict=strict, cache_dir=overlay.parent / "c")
    return apply_overlay(config, registry=REGISTRY)


def metadata(overlay: Path) -> OverlayMetadata:
    with OverlayReader(overlay) as reader:
        return OverlayMetadata.from_json(reader.metadata, reader.frames)


# --------------------------------------------------------------------------------------------
# bases: components and base checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "what"),
    [
        (ComponentRecord("encoder", "fancy", "vmdelta-encoder-fancy", "1.2", ref=0xA), "encoder 'fancy'"),
        (ComponentRecord("codec", "brotli", "vmdelta-codec-brotli", "0.3", id=1), "codec 'brotli'"),
        (ComponentRecord("source", "vmware", "vmdelta-source-vmware", "2.0"), "source 'vmware'"),
    ],
)
def test_a_missing_component_names_the_distribution_to_install(made, record: ComponentRecord, what: str) -> None:
    meta = metadata(made[2])
    needy = attrs.evolve(meta, components=[*meta.components, record])
    dist = record.distribution
    with pytest.raises(PluginError, match=rf"needs the {what} from {dist} {record.version}; .*pip install {dist}\)"):
        Decoders.find(needy, REGISTRY)


def test_filters_are_not_needed_to_apply_and_sources_must_write_the_image_kind(made) -> None:
    meta = metadata(made[2])
    trim = ComponentRecord("filter", "trim", "vmdelta-filter-trim", "1.0")
    decoders = Decoders.find(attrs.evolve(meta, components=[*meta.components, trim]), REGISTRY)
    assert {ref: e.name for ref, e in decoders.encoders.items()} == {int(Ref.RAW): "raw"}
    image = attrs.evolve(meta.images[0], source="memfile")
    with pytest.raises(FormatError, match="names source 'memfile', which does not write disk images"):
        Decoders.find(attrs.evolve(meta, images=[image]), REGISTRY)


@pytest.mark.parametrize("change", ["same size", "shorter"])
def test_a_wrong_base_is_refused_and_nothing_is_written(made, change: str) -> None:
    base, _, overlay = made
    data = bytearray(base.read_bytes())
    if change == "same size":
        data[10 * UNIT + 7] ^= 1
    else:
        del data[-UNIT:]
    other = base.with_name("other.base")
    other.write_bytes(bytes(data))
    before = sorted(os.listdir(base.parent))
    with pytest.raises(BaseMismatchError, match=f"{re.escape(str(other))} is not the base this overlay was made from"):
        apply(overlay, other, base.parent / "out.img")
    assert sorted(os.listdir(base.parent)) == before


# --------------------------------------------------------------------------------------------
# rebuild: frames, verification
# --------------------------------------------------------------------------------------------


def crafted(overlay: Path, items: list[tuple[int, int, int]]) -> Path:
    """``overlay`` with its items replaced by ZEROS items (offset, length, type), one per frame."""
    meta = metadata(overlay)
    path = overlay.with_name("crafted.vmdo")
    offsets, lengths, types = (np.array(column) for column in zip(*items, strict=True))
    with open(path, "wb") as f, ThreadPoolExecutor(1) as pool:
        writer = OverlayWriter(f, codec=REGISTRY.codec("none"), codec_id=0, level=None, frame_size=1, pool=pool)
        n = len(items)
        zeros = np.full(n, Ref.ZEROS, dtype=np.uint8)
        writer.add_items(0, offsets.astype(np.uint64), lengths, zeros, types, np.zeros(n, np.uint64), [None] * n)
        writer.finish(meta.to_json())
    return path


DISK = int(ItemType.DISK)


@pytest.mark.parametrize(
    ("items", "error", "message"),
    [
        ([(0, UNIT, int(ItemType.MEMORY))], FormatError, "items of the wrong image type for disk0"),
        ([(100, UNIT, DISK)], FormatError, "an item lies outside disk0 or off the unit grid"),
        ([(0, 512, DISK)], FormatError, "an item's length does not match its unit"),
        ([(2 * UNIT, UNIT, DISK), (0, UNIT, DISK)], FormatError, "items are not in address order"),
        ([(UNIT, UNIT, DISK), (UNIT, UNIT, DISK)], FormatError, "items are not in address order"),
        # well-formed items pass the frame checks, and the wrong image they give is caught later
        ([(0, UNIT, DISK), (UNIT, UNIT, DISK)], IntegrityError, "differs from the one the overlay was made from"),
    ],
    ids=["wrong type", "off the grid", "short", "backwards", "repeated", "well-formed"],
)
def test_items_that_are_not_what_and_where_their_frame_says_are_refused(made, items, error, message) -> None:
    base, _, overlay = made
    with pytest.raises(error, match=message):
        apply(crafted(overlay, items), base, base.parent / "out.img")
    assert not (base.parent / "out.img").exists()


def test_a_rebuilt_image_that_is_not_the_recorded_one_is_an_integrity_error(made, tmp_path: Path) -> None:
    _, modified, overlay = made
    image = metadata(overlay).images[0]
    # the artifact's own digest covers an exact artifact: the image is not read a second time
    assert verify_rebuilt(image, tmp_path / "never-read", None, NullProgress()) == image.digest
    scratch = tmp_path / "scratch"
    scratch.write_bytes(modified.read_bytes())
    image = attrs.evolve(image, artifact_digest=None)
    assert verify_rebuilt(image, scratch, None, NullProgress()) == image.digest
    with open(scratch, "r+b") as f:
        f.seek(5 * UNIT + 3)
        f.write(b"\xff")
    with pytest.raises(IntegrityError, match="rebuilt disk0 does not match the digest recorded at create time"):
        verify_rebuilt(image, scratch, None, NullProgress())


def test_dropped_units_come_from_the_base_and_strict_refuses_them(tmp_path: Path) -> None:
    base_data, modified_data = sample_pair(seed=7, units=24, grow=3000)
    base, modified = write_pair(tmp_path, "disk", base_data, modified_data)
    overlay = tmp_path / "o.vmdo"
    spec = ImageSpec("disk", base, modified, filters=[FilterSpec("dropall")])
    report = create_overlay(CreateConfig(overlay, [spec], cache_dir=tmp_path / "c"), registry=REGISTRY)
    with pytest.raises(ConfigError, match=r"--strict: .*\(dropall dropped \d+\)"):
        apply(overlay, base, tmp_path / "s.img", strict=True)
    assert not (tmp_path / "s.img").exists()
    (rebuilt,) = apply(overlay, base, tmp_path / "out.img").images
    # the base's bytes where units were dropped; the last unit, past the base, as modified
    expected = np.concatenate([base_data, modified_data[base_data.size :]])
    assert (tmp_path / "out.img").read_bytes() == expected.tobytes()
    assert rebuilt.dropped == {"dropall": report.metadata.images[0].filters[0].dropped} and rebuilt.dropped["dropall"]


# --------------------------------------------------------------------------------------------
# synthesis: outputs and side files
# --------------------------------------------------------------------------------------------


def test_only_an_output_it_was_given_can_take_the_rebuilt_image(tmp_path: Path) -> None:
    spec = ApplyImageSpec("disk", tmp_path / "b", tmp_path / "out.img", output_sides={"note": tmp_path / "out.note"})
    with OutputSet([]) as outputs:
        targets = Targets.make(outputs, spec)
        Path(targets.scratch.path).write_bytes(b"rebuilt")
        for elsewhere in (tmp_path / "elsewhere", spec.output):  # the user's name is not the pending file
            with pytest.raises(PluginError, match="which is not an output it was given"):
                targets.adopt(elsewhere)
        targets.adopt(targets.output.path)
        outputs.commit()
    assert (tmp_path / "out.img").read_bytes() == b"rebuilt" and (tmp_path / "out.note").read_bytes() == b""


@pytest.fixture
def noted(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A disk pair read by the ``noted`` source, each artifact with its note: base, base note, overlay."""
    base, modified = write_pair(tmp_path, "disk", *sample_pair(seed=8, units=24))
    (tmp_path / "base.note").write_bytes(b"base note: disk of the base VM\n")
    (tmp_path / "modified.note").write_bytes(b"modified note: disk of the customized VM, longer\n")
    spec = ImageSpec(
        "disk",
        base,
        modified,
        format="noted",
        base_sides={"note": tmp_path / "base.note"},
        modified_sides={"note": tmp_path / "modified.note"},
    )
    overlay = tmp_path / "o.vmdo"
    create_overlay(CreateConfig(overlay, [spec], cache_dir=tmp_path / "c"), registry=REGISTRY)
    return base, tmp_path / "base.note", overlay


@pytest.mark.parametrize("fail", [False, True], ids=["committed", "failed after writing"])
def test_side_files_are_read_at_create_and_written_at_apply_only_when_all_is_done(
    noted, fail: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, base_note, overlay = noted
    folder = base.parent
    out, out_note = folder / "out.img", folder / "out.note"
    monkeypatch.setattr(Noted, "fail", fail)
    sides = {"base_sides": {"note": base_note}, "output_sides": {"note": out_note}}
    if fail:
        with pytest.raises(PluginError, match="gave up after writing"):
            apply(overlay, base, out, **sides)
        assert not out.exists() and not out_note.exists()
        return
    apply(overlay, base, out, **sides)
    assert out_note.read_bytes() == (folder / "modified.note").read_bytes()
    assert out.read_bytes() == (folder / "disk.modified").read_bytes()


def test_a_side_output_that_is_an_input_is_refused_before_anything_is_written(noted) -> None:
    base, base_note, overlay = noted
    kept = base_note.read_bytes()
    with pytest.raises(ConfigError, match="same file as an input"):
        apply(overlay, base, base.parent / "out.img", base_sides={"note": base_note}, output_sides={"note": base_note})
    assert base_note.read_bytes() == kept and not (base.parent / "out.img").exists()
