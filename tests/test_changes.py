"""Change detection: exact, skips holes, and trusts change hints only against their own base."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmdelta_core import SourceImage, hookimpl
from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.builtin.file import FileSource
from vmdelta_core.changes import changed_units
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry


def image(data: np.ndarray, holes=None, hints=None, hints_base=None) -> SourceImage:
    return SourceImage(
        kind="disk",
        data=data,
        holes=np.array(holes or [], dtype=np.int64).reshape(-1, 2),
        hints=hints,
        hints_base=hints_base,
    )


def test_exact_units_and_tails() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 10 * 4096 + 100, dtype=np.uint8)
    modified = np.concatenate([base, np.zeros(3 * 4096, dtype=np.uint8), [1]]).astype(np.uint8)
    modified[5 * 4096 + 7] ^= 1
    modified[10 * 4096 + 99] ^= 1  # in the base's short last unit
    found = changed_units(image(base), image(modified), 4096)
    assert found.tolist() == [5, 10, 13]  # 11 and 12 are zero past the base's end


def test_holes_in_both_are_not_read() -> None:
    size = 3 * 4096 * 4096  # three 16 MiB chunks
    base = np.zeros(size, dtype=np.uint8)
    modified = base.copy()
    modified[3 * 4096] = 9
    # claim everything but unit 3 is a hole in both: a lie in a chunk that is all hole shows it
    # is not read
    modified[6000 * 4096] = 1
    holes = [(0, 3 * 4096), (4 * 4096, size - 4 * 4096)]
    assert changed_units(image(base, holes), image(modified, holes), 4096).tolist() == [3]


class HintedFileSource(FileSource):
    """A file source that claims only unit 0 may differ from the file named in options."""

    name = "hinted"

    def open(self, path, *, kind, options):
        img = super().open(path, kind=kind, options=options)
        if "against" in options:
            img.hints = np.array([0], dtype=np.int64)
            img.hints_base = Path(options["against"])
        return img


class HintedPlugin:
    @hookimpl
    def vmdelta_register_sources(self, register) -> None:
        register(HintedFileSource())


def test_hints_are_used_only_against_their_own_base(tmp_path: Path) -> None:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(HintedPlugin(), name="hinted")
    registry = Registry(pm)
    base = np.zeros(8 * 4096, dtype=np.uint8)
    other = base.copy()
    other[5 * 4096] = 7
    modified = base.copy()
    modified[0] = 1
    for name, data in (("base", base), ("other", other), ("modified", modified)):
        (tmp_path / name).write_bytes(data.tobytes())

    def changed(against: str) -> int:
        spec = ImageSpec(
            "disk",
            tmp_path / against,
            tmp_path / "modified",
            format="hinted",
            modified_options={"against": str(tmp_path / "base")},
        )
        report = create_overlay(
            CreateConfig(output=tmp_path / "o", images=[spec], cache_dir=tmp_path / "c"), registry=registry
        )
        return report.images[0].statistics["changed"]

    assert changed("base") == 1  # hints hold: only unit 0 compared
    assert changed("other") == 2  # another base: full comparison finds unit 5 too


def test_the_digest_taken_while_comparing_is_the_image_digest() -> None:
    from vmdelta_core.index import ImageDigest, image_digest

    rng = np.random.default_rng(3)
    for grow in (0, 5000, -3000, 3 * 4096):
        base = rng.integers(0, 256, 40 * 4096 + 123, dtype=np.uint8)
        modified = np.zeros(base.size + grow, dtype=np.uint8)
        modified[: min(base.size, modified.size)] = base[: min(base.size, modified.size)]
        modified[7 * 4096 : 9 * 4096] = 0
        holes = [(7 * 4096, 2 * 4096)]
        running = ImageDigest()
        changed_units(image(base), image(modified, holes), 4096, digest=running)
        assert running.hexdigest() == image_digest(image(modified, holes), 4096)
