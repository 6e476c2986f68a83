"""inspect --map: the picture of an overlay counts what the overlay's statistics count."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from samples import write_pair

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.cli import main, overlaymap
from vmdelta_core.components import Filter, FilterContext, FilterResult
from vmdelta_core.config import FilterSpec
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.metadata import ImageStatistics, OverlayMetadata
from vmdelta_core.testing import registry_with

Image = pytest.importorskip("PIL.Image", reason="inspect --map needs Pillow: pip install 'vmdelta-core[map]'")

UNIT = 4096


def expected_units(label: str, stats: ImageStatistics, placed: dict[str, int] | None = None) -> int:
    """The units of one map class, as the overlay's statistics count them. Units a filter dropped
    are drawn in its colour where the overlay places them (``placed``: their count per filter),
    else as unchanged (they are the base's after apply)."""
    placed = placed or {}
    if label.startswith("dropped by "):
        return placed.get(label.removeprefix("dropped by "), 0)
    counts = {
        "unchanged": stats.units - stats.changed + sum(n for f, n in stats.dropped.items() if f not in placed),
        "zero": stats.zero,
        "same as base memory": stats.base_memory,
        "same as base disk": stats.base_disk,
        "same as an earlier unit": stats.earlier,
    }
    if label.startswith("encoder "):
        use = stats.encoders.get(label.removeprefix("encoder "))
        return use.units if use else 0
    return counts[label]


def metadata_of(path: Path) -> OverlayMetadata:
    with OverlayReader(path) as reader:
        return OverlayMetadata.from_json(reader.metadata, reader.frames)


def pixels_by_class(picture: Path, classes: int) -> np.ndarray:
    with Image.open(picture) as image:
        assert image.mode == "P"
        indices = np.asarray(image)
    return np.bincount(indices.ravel(), minlength=classes)[:classes]


@pytest.mark.fixtures
@pytest.mark.parametrize("filtered", [False, True], ids=["no-filter", "trim"])
def test_the_map_of_a_real_capture_counts_what_the_statistics_count(
    realistic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], filtered: bool
) -> None:
    from vmdelta_core.registry import default_registry

    if filtered and not any(c.kind == "filter" and c.name == "trim" for c in default_registry()):
        pytest.skip("the trim filter is not installed")
    overlay, picture = tmp_path / "vm.overlay", tmp_path / "map.png"
    trim = ["--filter", f"trim:{realistic / 'trim-trace.log'}"] if filtered else []
    assert (
        main(
            [
                "create",
                "-q",
                "-o",
                str(overlay),
                "--memory",
                str(realistic / "base.mem"),
                str(realistic / "modified.mem"),
                "--disk",
                str(realistic / "base.img"),
                str(realistic / "modified.img"),
                *trim,
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert main(["inspect", str(overlay), "--map", str(picture)]) == 0
    assert f"wrote {picture}: a cell per unit" in " ".join(capsys.readouterr().out.split())

    meta = metadata_of(overlay)
    classes, _ = overlaymap.overlay_classes(meta)
    with OverlayReader(overlay) as reader:
        maps = list(overlaymap.read_image_maps(reader, meta, registry_with()))
    expected = np.array(
        [
            sum(
                expected_units(c.label, image.statistics, {f.name: f.dropped for f in image.filters if f.runs})
                * overlaymap.cell_size(m) ** 2
                for image, m in zip(meta.images, maps, strict=True)
            )
            for c in classes
        ]
    )
    assert expected[1:].sum() > 1000  # the capture changed; the picture shows it
    if filtered:  # trim dropped disk units, and the picture shows where
        assert [c.label for c in classes][-1] == "dropped by trim" and expected[-1] > 0
    assert pixels_by_class(picture, len(classes)).tolist() == expected.tolist()


@pytest.fixture
def small_overlay(tmp_path: Path) -> Path:
    """An overlay of one disk of 1000 units: zero, duplicated and random changes, and one lone
    changed unit (number 777) far from the others."""
    rng = np.random.default_rng(5)
    units = 1000
    base = rng.integers(0, 256, units * UNIT, dtype=np.uint8)
    modified = base.copy()
    modified[10 * UNIT : 20 * UNIT] = 0
    modified[30 * UNIT : 40 * UNIT] = rng.integers(0, 256, 10 * UNIT, dtype=np.uint8)
    modified[50 * UNIT : 60 * UNIT] = modified[30 * UNIT : 40 * UNIT]
    modified[777 * UNIT] ^= 1
    b, m = write_pair(tmp_path, "disk", base, modified)
    overlay = tmp_path / "small.overlay"
    config = CreateConfig(output=overlay, images=[ImageSpec("disk", b, m, format="file")], cache_dir=tmp_path / "c")
    create_overlay(config, registry=registry_with())
    return overlay


def test_a_large_image_gets_a_cell_per_run_and_a_lone_change_stays_visible(
    small_overlay: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = small_overlay
    monkeypatch.setattr(overlaymap, "MAX_PIXELS", 100)
    meta = metadata_of(overlay)
    with OverlayReader(overlay) as reader:
        (m,) = overlaymap.read_image_maps(reader, meta, registry_with())
    assert (m.per_pixel, m.pixels.size) == (10, 100)
    classes, _ = overlaymap.overlay_classes(meta)
    stats = meta.images[0].statistics
    assert m.counts.tolist() == [expected_units(c.label, stats) for c in classes]  # exact at any scale
    assert m.pixels[77] != overlaymap.UNCHANGED  # one changed unit among ten
    assert m.pixels[1] == overlaymap.ZERO and m.pixels[0] == overlaymap.UNCHANGED


def test_without_pillow_one_line_says_how_to_install_it(
    small_overlay: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = small_overlay
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    picture = tmp_path / "map.png"
    code = main(["inspect", str(overlay), "--map", str(picture)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and not picture.exists()
    assert (
        err
        == "vmdelta: error: inspect --map draws with Pillow, which is not installed: pip install 'vmdelta-core[map]'\n"
    )


def test_a_map_of_standard_input_is_refused_in_one_line(
    small_overlay: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["inspect", "-", "--map", str(tmp_path / "map.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "save it first" in err


def test_commands_that_draw_nothing_do_not_import_pillow() -> None:
    check = "import sys; from vmdelta_core.cli import main; main(['plugins', '--json']); print('PIL' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.rstrip().endswith("False")


class DropEveryOther(Filter):
    """An in-test filter with a long name, so that its legend line is the widest."""

    name = "drop-every-other-changed-unit-of-the-image-as-a-test-of-the-legend"

    def select(self, context: FilterContext, candidates: np.ndarray) -> FilterResult:
        return FilterResult(np.arange(candidates.size) % 2 == 0, "in-test")


class Filters:
    @hookimpl
    def vmdelta_register_filters(self, register: Callable[[Filter], None]) -> None:
        register(DropEveryOther())


def test_every_line_of_text_fits_in_the_picture(tmp_path: Path) -> None:
    registry = registry_with(Filters())
    rng = np.random.default_rng(6)
    base = rng.integers(0, 256, 64 * UNIT, dtype=np.uint8)
    modified = base.copy()
    modified[: 8 * UNIT] ^= 1
    b, m = write_pair(tmp_path, "disk", base, modified)
    overlay, picture = tmp_path / "filtered.overlay", tmp_path / "map.png"
    spec = ImageSpec("disk", b, m, format="file", filters=[FilterSpec(DropEveryOther.name)])
    create_overlay(CreateConfig(output=overlay, images=[spec], cache_dir=tmp_path / "c"), registry=registry)
    overlaymap.write_map(overlay, picture, registry)
    classes, _ = overlaymap.overlay_classes(metadata_of(overlay))
    with Image.open(picture) as image:
        indices = np.asarray(image)
    ink = len(classes) + 1  # the palette: the classes, the background, then the ink
    drawn = np.flatnonzero((indices == ink).any(axis=0))
    assert drawn.size and drawn.max() < indices.shape[1] - 5  # nothing cut at the right edge
