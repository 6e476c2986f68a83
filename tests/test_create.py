"""create, stage by stage: the plan refuses before anything is opened, the filters' answers are
checked and corrected, the statistics count what was written, the metadata reads back as written."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from samples import sample_pair, write_pair

from vmdelta_core import Encoder, Filter, FilterContext, FilterResult, Source, SourceImage, hookimpl
from vmdelta_core.api import CreateConfig, FilterSpec, ImageSpec, create_overlay
from vmdelta_core.components import SideFile
from vmdelta_core.create.changes import changed_units
from vmdelta_core.create.filters import select_units
from vmdelta_core.create.plan import ImagePlan, assign_refs, resolve_encoders
from vmdelta_core.create.sources import OpenedPair
from vmdelta_core.errors import ConfigError, PluginError
from vmdelta_core.fileio import open_file_image
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.metadata import ImageStatistics, OverlayMetadata
from vmdelta_core.overlay.schema import Ref
from vmdelta_core.registry import Registry
from vmdelta_core.testing import registry_with

UNIT = 4096
GOLDEN = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "schemas" / "golden").glob("*.vmdo"))


class Flip(Encoder):
    """Stores a unit reversed; declines units whose first byte is odd."""

    def __init__(self, name: str = "flip", wire_ref: int | None = None, default_priority: int | None = None) -> None:
        self.name, self.wire_ref, self.default_priority = name, wire_ref, default_priority

    def encode(self, bases, targets):
        return [bytes(t)[::-1] if t[0] % 2 == 0 else None for t in targets]

    def decode(self, bases, payloads, lengths):
        return [bytes(p)[::-1] for p in payloads]


class Recording(Source):
    """Reads raw files, remembering every file it opened; has a side file ``note``."""

    name = "recording"
    side_files = (SideFile("note", "a few bytes beside the image"),)

    def __init__(self) -> None:
        self.opened: list[Path] = []

    def open(self, path: Path, *, kind: Any, options: Mapping[str, Any]) -> SourceImage:
        self.opened.append(Path(path))
        return open_file_image(path, kind)


class Masked(Filter):
    """Drops what ``mask(candidates)`` says; a ``bare`` one forgets to wrap it in a FilterResult."""

    def __init__(self, name: str, mask: Callable[[np.ndarray], Any], *, kinds=("memory", "disk"), **flags: bool):
        self.name, self.mask, self.kinds = name, mask, frozenset(kinds)
        self.needs_input, self.bare = flags.get("needs_input", False), flags.get("bare", False)

    def select(self, context: FilterContext, candidates: np.ndarray) -> Any:
        drop = self.mask(candidates)
        return drop if self.bare else FilterResult(drop, "in-test", {"candidates": int(candidates.size)})


def keep_all(c: np.ndarray) -> np.ndarray:
    return np.zeros(c.shape, dtype=bool)


class Components:
    """An in-test plugin registering the components it is given."""

    def __init__(self, *components: object) -> None:
        self.components = components

    def _each(self, kind: type, register: Callable[[Any], None]) -> None:
        for component in (c for c in self.components if isinstance(c, kind)):
            register(component)

    @hookimpl
    def vmdelta_register_sources(self, register) -> None:
        self._each(Source, register)

    @hookimpl
    def vmdelta_register_filters(self, register) -> None:
        self._each(Filter, register)

    @hookimpl
    def vmdelta_register_encoders(self, register) -> None:
        self._each(Encoder, register)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def plan_config(folder: Path, **fault: Any) -> CreateConfig:
    """A memory pair then a disk pair, both read by the recording source; ``fault`` goes to the
    disk pair's spec, or to the config for the config's own keys."""
    overlay = {key: fault.pop(key) for key in ("codec", "encoder_options") if key in fault}
    images = [
        ImageSpec("memory", folder / "m.base", folder / "m.modified", format="recording"),
        ImageSpec("disk", folder / "d.base", folder / "d.modified", format="recording", **fault),
    ]
    return CreateConfig(folder / "o.vmdo", images, cache_dir=folder / "cache", threads=1, **overlay)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    write_pair(folder, "m", *sample_pair(seed=1, units=24))
    write_pair(folder, "d", *sample_pair(seed=2, units=24))
    return folder


@pytest.mark.parametrize(
    ("fault", "error", "message"),
    [
        pytest.param(lambda d: {}, None, None, id="no fault"),
        pytest.param(lambda d: {"filters": [FilterSpec("traced")]}, ConfigError, "needs an input", id="no input"),
        pytest.param(
            lambda d: {"filters": [FilterSpec("traced", d / "no.log")]}, ConfigError, "no.log does not exist", id="gone"
        ),
        pytest.param(lambda d: {"filters": [FilterSpec("memonly")]}, ConfigError, "not apply to disk", id="kind"),
        pytest.param(lambda d: {"codec": "brotli"}, PluginError, "no codec named 'brotli'", id="codec"),
        pytest.param(lambda d: {"encoders": ("nope",)}, PluginError, "no encoder named 'nope'", id="encoder"),
        pytest.param(
            lambda d: {"encoder_options": {"flip": {"x": 1}}}, ConfigError, "this overlay does not use", id="options"
        ),
        pytest.param(
            lambda d: {"base_sides": {"ram": d / "d.base"}}, ConfigError, "no side file 'ram'; it has: note", id="side"
        ),
        pytest.param(lambda d: {"modified_sides": {"note": d / "x"}}, ConfigError, "does not exist", id="side gone"),
    ],
)
def test_every_config_error_is_found_before_anything_is_opened_or_written(inputs: Path, fault, error, message) -> None:
    source = Recording()
    traced, memonly = Masked("traced", keep_all, needs_input=True), Masked("memonly", keep_all, kinds=["memory"])
    registry = registry_with(Components(source, traced, memonly))
    before = sorted(os.listdir(inputs))
    if error is None:  # the same config without a fault opens every artifact and caches the indexes
        create_overlay(plan_config(inputs), registry=registry)
        assert len(source.opened) == 4 and (inputs / "o.vmdo").is_file() and (inputs / "cache").is_dir()
        return
    with pytest.raises(error, match=message):
        create_overlay(plan_config(inputs, **fault(inputs)), registry=registry)
    assert source.opened == [] and sorted(os.listdir(inputs)) == before


def refs_of(registry: Registry, names: list[str]) -> dict[str, int]:
    return {name: choice.ref for name, choice in assign_refs(registry, sorted(names)).items()}


def test_encoders_keep_their_classic_ids_and_the_others_get_the_spare_nibbles_in_order() -> None:
    encoders = [Flip("zdelta", 0x2), Flip("bs", 0x7), Flip("also-bs", 0x7), *(Flip(f"e{k}") for k in range(6))]
    refs = refs_of(registry_with(Components(*encoders)), [e.name for e in encoders])
    # a second claim on a classic id gets the next spare nibble; an undeclared encoder that sorts
    # first never takes a classic id
    spare = {"bs": 0xA, "e0": 0xB, "e1": 0xC, "e2": 0xD, "e3": 0xE, "e4": 0xF, "e5": 0x0}
    assert refs == {"raw": 0x1, "also-bs": 0x7, "zdelta": 0x2, **spare}


def test_eleven_encoders_fit_an_overlay_and_a_twelfth_is_refused() -> None:
    eleven = [Flip("x2", 0x2), Flip("x7", 0x7), Flip("x9", 0x9), *(Flip(f"e{k}") for k in range(7))]
    registry = registry_with(Components(*eleven, Flip("twelfth")))
    assert sorted(refs_of(registry, [e.name for e in eleven]).values()) == [0, 1, 2, 7, 9, 10, 11, 12, 13, 14, 15]
    with pytest.raises(ConfigError, match="too many encoders"):
        assign_refs(registry, [*(e.name for e in eleven), "twelfth"])


def test_an_encoder_keeps_the_spare_id_it_asks_for_whatever_the_names_sort_as() -> None:
    encoders = [Flip("aaa"), Flip("zzz", 0xA)]
    assert refs_of(registry_with(Components(*encoders)), ["aaa", "zzz"]) == {"raw": 0x1, "aaa": 0xB, "zzz": 0xA}


@pytest.mark.parametrize("wanted", [0x3, 0x4, 0x5, 0x6, 0x8, 0x10, -1])
def test_an_encoder_asking_for_a_reserved_id_is_refused(wanted: int) -> None:
    with pytest.raises(PluginError, match=r"encoder 'greedy' asks for ref id .*, which is reserved"):
        assign_refs(registry_with(Components(Flip("greedy", wanted))), ["greedy"])


def test_default_encoders_are_those_with_a_priority_lowest_first_then_raw() -> None:
    assert resolve_encoders(registry_with(), None, None) == (("raw",), "fixed")
    registry = registry_with(
        Components(Flip("late", default_priority=5), Flip("early", default_priority=1), Flip("never"))
    )
    assert resolve_encoders(registry, None, None) == (("early", "late", "raw"), "best")
    assert resolve_encoders(registry, ("never",), None) == (("never",), "best")
    assert resolve_encoders(registry, ("raw",), None) == (("raw",), "fixed")
    assert resolve_encoders(registry, ("never",), "first-smaller") == (("never",), "first-smaller")
    with pytest.raises(PluginError, match="no encoder named 'gone'"):
        resolve_encoders(registry, ("never", "gone"), None)


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------


def selected(base: np.ndarray, modified: np.ndarray, *filters: Masked) -> tuple[np.ndarray, Any]:
    """The changed units of a disk pair, and what ``filters`` leave of them."""
    spec = ImageSpec("disk", "b", "m", filters=[FilterSpec(f.name) for f in filters])
    plan = ImagePlan(spec, "disk0", "file", "file", ("raw",), "fixed")
    pair = OpenedPair(plan, SourceImage("disk", base), SourceImage("disk", modified))
    changed = changed_units(pair.base, pair.modified, UNIT)
    return changed, select_units(pair, changed, registry_with(Components(*filters)), UNIT)


@pytest.mark.parametrize(("tail", "last_changed"), [("random", True), ("zeros", False), ("none", False)])
def test_a_grown_image_keeps_its_last_unit_and_the_filter_that_dropped_it_is_corrected(tail, last_changed) -> None:
    base, modified = sample_pair(seed=3, units=24, grow=5000 if tail == "random" else 0)
    if tail == "zeros":
        modified = np.concatenate([modified, np.zeros(5000, dtype=np.uint8)])
    last = -(-modified.size // UNIT) - 1
    changed, selection = selected(base, modified, Masked("keep", keep_all), Masked("drop", lambda c: c >= 0))
    assert (changed[-1] == last) == last_changed
    keep, drop = selection.filters
    assert keep.dropped == 0 and drop.details == {"candidates": changed.size}
    if tail == "none":  # not grown: the filter has its way
        assert selection.kept.size == 0 and drop.dropped == changed.size
        assert np.array_equal(selection.dropped, changed)
    else:
        assert selection.kept.tolist() == [last] and last not in selection.dropped
        assert drop.dropped == selection.dropped.size == changed.size - last_changed
        assert np.array_equal(selection.dropped, changed[changed != last])


@pytest.mark.parametrize(
    ("mask", "bare"),
    [
        pytest.param(lambda c: np.ones(c.size + 1, dtype=bool), False, id="too long"),
        pytest.param(lambda c: np.ones(c.size, dtype=np.uint8), False, id="not boolean"),
        pytest.param(lambda c: np.ones((c.size, 1), dtype=bool), False, id="two-dimensional"),
        pytest.param(lambda c: None, False, id="none"),
        pytest.param(keep_all, True, id="bare mask"),
    ],
)
def test_a_wrong_answer_from_a_filter_is_a_plugin_error_naming_it(mask, bare: bool) -> None:
    with pytest.raises(PluginError, match="filter 'sloppy'"):
        selected(*sample_pair(seed=4, units=24), Masked("sloppy", mask, bare=bare))


# --------------------------------------------------------------------------------------------
# units and metadata
# --------------------------------------------------------------------------------------------


COUNTED = {"zero": Ref.ZEROS, "base_memory": Ref.BASE_MEM, "base_disk": Ref.BASE_DISK, "earlier": Ref.SELF}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Registry]:
    """A memory and a grown disk pair, with every reference class, two encoders and a filter."""
    folder = tmp_path_factory.mktemp("made")
    mem_base, mem_mod = sample_pair(seed=1, units=32)
    disk_base, disk_mod = sample_pair(seed=2, units=32, grow=5000)
    disk_mod[2 * UNIT : 3 * UNIT] = mem_base[5 * UNIT : 6 * UNIT]  # in the memory base
    disk_mod[3 * UNIT : 4 * UNIT] = mem_mod[12 * UNIT : 13 * UNIT]  # new in the memory image
    log = folder / "every-third.log"
    log.write_text("drop every third candidate\n")
    registry = registry_with(Components(Flip("flip"), Masked("third", lambda c: np.arange(c.size) % 3 == 2)))
    specs = [
        ImageSpec(kind, *write_pair(folder, kind, base, modified), encoders=("flip", "raw"), policy="fixed")
        for kind, base, modified in (("memory", mem_base, mem_mod), ("disk", disk_base, disk_mod))
    ]
    specs[1] = attrs.evolve(specs[1], filters=(FilterSpec("third", log),))
    create_overlay(CreateConfig(folder / "o.vmdo", specs, cache_dir=folder / "c", threads=2), registry=registry)
    return folder / "o.vmdo", registry


def statistics_of_items(overlay: Path, registry: Registry) -> list[ImageStatistics]:
    """Each image's statistics, once they are checked against the items the overlay holds."""
    with OverlayReader(overlay) as reader:
        meta = OverlayMetadata.from_json(reader.metadata, reader.frames)
        names = {ref: c.name for ref, c in meta.encoders().items()}
        for number, image in enumerate(meta.images):
            refs: list[int] = []
            payloads: dict[str, list[int]] = {}
            for frame in reader.frames_of(number):
                cols = reader.items(frame, registry.codec(meta.codecs()[frame.codec].name))
                refs += cols.refs.tolist()
                for ref, payload in zip(cols.refs.tolist(), cols.payloads, strict=True):
                    if ref in names:
                        payloads.setdefault(names[ref], []).append(len(payload))
            stats = image.statistics
            for field, ref in COUNTED.items():
                assert getattr(stats, field) == refs.count(ref), (image.name, field)
            assert {n: (u.units, u.bytes) for n, u in stats.encoders.items()} == {
                n: (len(p), sum(p)) for n, p in payloads.items()
            }
            assert stats.units == -(-image.size // meta.unit_size)
            assert len(refs) == stats.changed - sum(stats.dropped.values())
    return [image.statistics for image in meta.images]


def test_statistics_count_exactly_the_items_written(made: tuple[Path, Registry]) -> None:
    memory, disk = statistics_of_items(*made)
    # the pairs were made so that every counter is exercised
    assert all(s.zero and s.base_memory and s.earlier for s in (memory, disk)) and disk.base_disk
    assert {*memory.encoders, *disk.encoders} == {"flip", "raw"} and disk.dropped["third"] > 0


@pytest.mark.fixtures
def test_statistics_of_real_captures_count_the_items_written(realistic: Path, tmp_path: Path) -> None:
    ram = realistic / "variants" / "qemu-7.2-ignore-shared"
    specs = [
        ImageSpec(kind, base, modified, encoders=("flip", "raw"), policy="fixed")
        for kind, base, modified in (
            ("memory", ram / "base-ram.raw", ram / "modified-ram.raw"),
            ("disk", realistic / "base.img", realistic / "modified.img"),
        )
    ]
    registry = registry_with(Components(Flip("flip")))
    create_overlay(CreateConfig(tmp_path / "o.vmdo", specs, cache_dir=tmp_path / "c"), registry=registry)
    memory, disk = statistics_of_items(tmp_path / "o.vmdo", registry)
    # a guest's page cache holds its disk's blocks: real memory refers to the disk base
    assert memory.base_disk and memory.zero and disk.earlier and disk.zero


@pytest.mark.parametrize("name", ["created", *GOLDEN])
def test_metadata_reads_back_as_written(name: str, made: tuple[Path, Registry], golden_dir: Path) -> None:
    with OverlayReader(made[0] if name == "created" else golden_dir / name) as reader:
        assert OverlayMetadata.from_json(reader.metadata, reader.frames).to_json() == reader.metadata
