"""Change detection: exact, skips holes, and trusts change hints only against their own base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vmdelta_core import SourceImage, hookimpl
from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.builtin.file import FileSource
from vmdelta_core.create.changes import changed_units
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
    option_names = frozenset({"against"})

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
        return report.images[0].statistics.changed

    assert changed("base") == 1  # hints hold: only unit 0 compared
    assert changed("other") == 2  # another base: full comparison finds unit 5 too


def test_the_digest_taken_while_comparing_is_the_image_digest() -> None:
    from vmdelta_core.index import image_digest
    from vmdelta_core.overlay.digest import ImageDigest

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


@st.composite
def sparse_pairs(draw) -> tuple[np.ndarray, list, np.ndarray, list]:
    """A base and a modified image of a few units each (the sizes differ), with zero runs that
    are declared holes, some of them not unit-aligned."""
    unit = 512

    def one(size: int) -> tuple[np.ndarray, list]:
        data = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), dtype=np.uint8).copy()
        holes = []
        for start, length in draw(st.lists(st.tuples(st.integers(0, size), st.integers(1, 6 * unit)), max_size=4)):
            length = min(length, size - start)
            if length > 0:
                data[start : start + length] = 0
                holes.append((start, length))
        holes.sort()
        merged: list[list[int]] = []
        for start, length in holes:
            if merged and start <= merged[-1][0] + merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], start + length - merged[-1][0])
            else:
                merged.append([start, length])
        return data, [tuple(h) for h in merged]

    base, base_holes = one(draw(st.integers(0, 12 * unit)))
    modified, holes = one(draw(st.integers(0, 12 * unit)))
    if draw(st.booleans()):  # share content, so that unchanged units occur
        n = min(base.size, modified.size)
        modified[:n] = np.where(modified[:n] == 0, 0, base[:n])
    return base, base_holes, modified, holes


@settings(max_examples=300, deadline=None)
@given(sparse_pairs())
def test_holes_skip_exactly_what_is_zero_on_both_sides(pair) -> None:
    """With holes stepped around at any length (the chunk made tiny), the changed units and the
    digest are the ones a plain comparison of the bytes gives."""
    from vmdelta_core import index
    from vmdelta_core.overlay.digest import ImageDigest

    base, base_holes, modified, holes = pair
    unit = 512
    count = -(-modified.size // unit)
    padded_m = np.zeros(count * unit, dtype=np.uint8)
    padded_m[: modified.size] = modified
    padded_b = np.zeros(count * unit, dtype=np.uint8)
    padded_b[: min(base.size, count * unit)] = base[: count * unit]
    padded_b[modified.size :] = 0  # the rebuilt image ends where the modified does
    truth = np.flatnonzero((padded_m.reshape(-1, unit) != padded_b.reshape(-1, unit)).any(axis=1))
    plain = ImageDigest()
    plain.update(modified)
    saved = index._CHUNK_UNITS
    index._CHUNK_UNITS = 1
    try:
        running = ImageDigest()
        found = changed_units(image(base, base_holes), image(modified, holes), unit, digest=running)
    finally:
        index._CHUNK_UNITS = saved
    assert found.tolist() == truth.tolist()
    assert running.hexdigest() == plain.hexdigest()


def test_a_huge_claimed_sparse_tail_costs_nothing_per_unit(tmp_path: Path) -> None:
    """A modified image claiming a terabyte past a small base (a sparse, grown disk) is compared
    in memory that follows its data: no array of one entry per unit is made."""
    import tracemalloc

    from vmdelta_core.fileio import open_file_image

    path = tmp_path / "grown.img"
    with open(path, "wb") as f:
        f.write(b"data" * 1024)
        f.truncate(1 << 40)
    base = np.zeros(4096 * 4, dtype=np.uint8)
    with open_file_image(path, "disk") as modified:
        tracemalloc.start()
        try:
            found = changed_units(image(base), modified, 4096)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert found.tolist() == [0] and peak < 16 << 20
