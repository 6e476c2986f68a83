"""The size mode: ``--level max``, frames of the ``zstd-base`` codec compressed against the base."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard
from make_golden import golden_inputs, golden_items, golden_overlay
from test_container import _apply_golden, reseal

from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.builtin.codecs import MAX_PREFIX, MAX_PREFIX_RUNS, ZstdBaseCodec, ZstdCodec
from vmdelta_core.cli import main
from vmdelta_core.components import SourceImage
from vmdelta_core.config import SIZE_MODE_FRAME, load_pipeline, size_mode
from vmdelta_core.create.prefix import FramePrefixes
from vmdelta_core.errors import ConfigError, FormatError, VmdeltaError
from vmdelta_core.fuzzing import check_untrusted
from vmdelta_core.overlay.container import OverlayReader, decompress_frame
from vmdelta_core.overlay.convert import convert_overlay
from vmdelta_core.overlay.items import join_payloads, pack_items, split_payloads
from vmdelta_core.overlay.schema import ItemType, Ref
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry
from vmdelta_core.testing import files_identical

REGISTRY = Registry(new_plugin_manager(load_entry_points=False))
CODEC = ZstdBaseCodec()


# ------------------------------------------------------------------------------------------------
# the golden overlay


#: the golden file as create writes it today, and as the first size-mode writer wrote it (every
#: disk unit's own address in its frame's prefix): the same format, so both must apply
@pytest.mark.parametrize("name", ["overlay-zstd-base.vmdo", "overlay-zstd-base-first.vmdo"])
def test_the_golden_zstd_base_overlay_still_applies(golden_dir: Path, tmp_path: Path, name: str) -> None:
    rebuilt = _apply_golden(tmp_path, golden_dir / name)
    assert rebuilt == [s.modified.read_bytes() for s in golden_inputs(tmp_path)]


def test_the_golden_zstd_base_overlay_is_reproduced_byte_for_byte(golden_dir: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.vmdo"
    golden_overlay(tmp_path, fresh, "zstd-base")
    with OverlayReader(golden_dir / "overlay-zstd-base.vmdo") as old, OverlayReader(fresh) as new:
        assert old.frames == new.frames  # the same frames, byte for byte (their checksums)
        assert old.metadata["settings"] == new.metadata["settings"]


def test_its_stream_form_applies_as_it_arrives(golden_dir: Path, tmp_path: Path) -> None:
    stream = tmp_path / "overlay.vmds"
    with OverlayReader(golden_dir / "overlay-zstd-base.vmdo") as reader, open(stream, "wb") as f:
        convert_overlay(reader, f, stream=True)
    specs = golden_inputs(tmp_path)
    outputs = [tmp_path / f"out-{spec.kind}" for spec in specs]
    config = ApplyConfig(
        overlay=Path("-"),
        images=[ApplyImageSpec(s.kind, s.base, o) for s, o in zip(specs, outputs, strict=True)],
        cache_dir=tmp_path / "cache",
    )
    with open(stream, "rb", buffering=0) as f:
        apply_overlay(config, registry=REGISTRY, stream=f)
    assert [o.read_bytes() for o in outputs] == [s.modified.read_bytes() for s in specs]


def test_its_frames_name_base_runs_and_need_the_base(golden_dir: Path) -> None:
    with OverlayReader(golden_dir / "overlay-zstd-base.vmdo") as reader:
        entry = next(reader.frames_of(0))
        stored = reader.stored(entry)
        count, table = struct.unpack_from(">II", stored)
        assert count >= 1 and table > 0  # the raw units' own addresses at least
        with pytest.raises(FormatError, match="against its base"):
            decompress_frame(entry, stored, CODEC, "frame")


def _prefix_blocks(kind: str, base: bytes, units: list[tuple[int, bytes]]) -> set[int]:
    """The 4 KiB base blocks the size mode's chooser puts in the prefix of one frame of ``units``
    (address, bytes)."""
    image = SourceImage(kind, np.frombuffer(base, dtype=np.uint8))  # type: ignore[arg-type]
    item = ItemType.DISK if kind == "disk" else ItemType.MEMORY
    frame = pack_items(
        [o for o, _ in units],
        [len(u) for _, u in units],
        [int(Ref.RAW)] * len(units),
        [int(item)] * len(units),
        [0] * len(units),
        [u for _, u in units],
    )
    runs, prefix = FramePrefixes([image])(0, frame)
    assert prefix == b"".join(base[o : o + n] for o, n in runs)
    return {block for o, n in runs for block in range(o // 4096, (o + n + 4095) // 4096)}


def test_a_disk_unit_is_compressed_against_where_its_content_lies_not_its_unrelated_address() -> None:
    base = random.Random(5).randbytes(64 * 4096)
    moved = base[40 * 4096 + 100 : 41 * 4096 + 100]  # a block of the base, shifted: dedup misses it
    fresh = random.Random(6).randbytes(4096)  # new content: the block at its address is unrelated
    edited = bytearray(base[10 * 4096 : 11 * 4096])
    edited[::512] = bytes(8)  # the block at its address, a few bytes changed
    covered = _prefix_blocks("disk", base, [(4 * 4096, moved), (6 * 4096, fresh), (10 * 4096, bytes(edited))])
    assert {40, 41, 10} <= covered  # where the moved block lies, and the edited block's own address
    assert not {4, 6} & covered  # not the unrelated blocks at the other units' addresses


def test_a_memory_page_keeps_its_own_address_in_the_prefix() -> None:
    base = random.Random(5).randbytes(64 * 4096)
    moved = base[40 * 4096 + 100 : 41 * 4096 + 100]
    assert {4, 40, 41} <= _prefix_blocks("memory", base, [(4 * 4096, moved)])


def test_a_unit_found_shifted_in_the_base_costs_little_and_needs_that_base() -> None:
    base = random.Random(4).randbytes(1 << 16)
    unit = base[1000:5096]  # unaligned: unit dedup cannot find it
    items = pack_items([4096], [4096], [int(Ref.RAW)], [int(ItemType.DISK)], [0], [unit])
    stored = _frame([(0, 8192)], base, items)
    assert len(stored) < 200 < len(ZstdCodec().compress(items, 19))
    assert CODEC.decompress_frame(stored, len(items), lambda o, n: base[o : o + n]) == items
    wrong = bytes(len(base))
    result = check_untrusted(
        "zstd-base frame", lambda: CODEC.decompress_frame(stored, len(items), lambda o, n: wrong[o : o + n])
    )
    assert isinstance(result, FormatError) or result != items


# ------------------------------------------------------------------------------------------------
# the codec and the split items, against damage


def _frame(runs: list[tuple[int, int]], base: bytes, data: bytes) -> bytes:
    codec = CODEC.bind(lambda image, frame: (runs, b"".join(base[o : o + n] for o, n in runs)))
    return codec.compress_frame(0, data, 3)


def test_split_items_rejoin_to_every_kind_of_record() -> None:
    items = golden_items()
    split = split_payloads(items)
    assert split != items and sorted(split) == sorted(items)
    assert join_payloads(split) == items


def test_a_frame_round_trips_against_its_runs() -> None:
    base = random.Random(3).randbytes(1 << 16)
    items = golden_items()
    stored = _frame([(0, 4096), (8192, 100)], base, items)
    assert CODEC.decompress_frame(stored, len(items), lambda o, n: base[o : o + n]) == items


def _head(count: int, table: bytes) -> bytes:
    return struct.pack(">II", count, len(table)) + table


def _table(runs: list[tuple[int, int]]) -> bytes:
    return zstandard.ZstdCompressor().compress(b"".join(struct.pack(">QI", g, n) for g, n in runs))


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"\0\0\0", "shorter than its head"),
        (_head(MAX_PREFIX_RUNS + 1, b"x"), "cannot hold"),
        (struct.pack(">II", 1, 1 << 20), "cannot hold"),
        (_head(1, b""), "cannot hold"),
        (_head(0, b"junk"), "cannot hold"),
        (_head(1, _table([(0, 0)])), "run of 0 bytes"),
        (_head(1, _table([((1 << 52) - 10, 20)])), "run of 20 bytes"),
        (_head(2, _table([(0, MAX_PREFIX), (0, 1)])), "more than"),
        (_head(2, _table([(0, 10)])), "does not declare"),
        (_head(1, b"\x28\xb5\x2f\xfd" + bytes(8)), "run table"),
    ],
)
def test_a_damaged_run_table_is_refused_before_the_base_is_read(head: bytes, message: str) -> None:
    def read(offset: int, length: int) -> bytes:
        raise AssertionError("the base was read")

    with pytest.raises(FormatError, match=message):
        CODEC.decompress_frame(head if len(head) < 8 else head + zstandard.ZstdCompressor().compress(b"x"), 1, read)


def test_a_run_past_the_base_is_refused_at_apply(golden_dir: Path, tmp_path: Path) -> None:
    base = golden_inputs(tmp_path)[0].base.read_bytes()
    with pytest.raises(FormatError, match="past its end"):
        decompress_frame_from_apply(tmp_path, _head(1, _table([(len(base) - 10, 20)])))


def decompress_frame_from_apply(folder: Path, head: bytes) -> None:
    """Apply the golden overlay with its first frame's run table replaced by ``head``."""
    data = bytearray((Path(__file__).parent.parent / "schemas/golden/overlay-zstd-base.vmdo").read_bytes())
    with OverlayReader(Path(__file__).parent.parent / "schemas/golden/overlay-zstd-base.vmdo") as reader:
        entry = next(reader.frames_of(0))
        stored = reader.stored(entry)
    _, table = struct.unpack_from(">II", stored)
    rest = stored[8 + table :]
    replaced = head + rest
    assert len(replaced) <= len(stored)
    replaced += bytes(len(stored) - len(replaced))  # same length: the index stays in place
    data[entry.file_offset : entry.file_offset + len(stored)] = replaced
    path = folder / "damaged.vmdo"
    path.write_bytes(reseal(data))  # the checksums recomputed, so the damage reaches the codec
    _apply_golden(folder, path)


def test_random_damage_to_a_stored_frame_is_refused_cleanly() -> None:
    rng = random.Random(5)
    base = rng.randbytes(1 << 15)
    items = golden_items()
    stored = _frame([(0, 8192), (12288, 4096)], base, items)
    for _ in range(400):
        damaged = bytearray(stored)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        result = check_untrusted(
            "zstd-base frame",
            lambda d=bytes(damaged): CODEC.decompress_frame(
                d, len(items), lambda o, n: base[o : o + n].ljust(n, b"\0")
            ),
        )
        assert isinstance(result, VmdeltaError) or len(result) == len(items)


def test_damaged_split_items_are_refused() -> None:
    split = split_payloads(golden_items())
    for cut in range(1, len(split), 7):
        result = check_untrusted("split items", lambda c=cut: join_payloads(split[:c]))
        # a cut may happen to leave fewer whole records: the index's item count catches that
        assert isinstance(result, FormatError) or len(result) == cut, f"cut at {cut}"
    grown = split + b"\0" * 11
    assert isinstance(check_untrusted("split items", lambda: join_payloads(grown)), VmdeltaError)


# ------------------------------------------------------------------------------------------------
# --level max


def _config(tmp_path: Path, **kwargs: object) -> CreateConfig:
    spec = ImageSpec("disk", tmp_path / "b", tmp_path / "m")
    return CreateConfig(output=tmp_path / "o", images=[spec], **kwargs)  # type: ignore[arg-type]


def test_level_max_with_zstd_is_the_base_prefixed_codec_on_raw_units(tmp_path: Path) -> None:
    config = size_mode(_config(tmp_path, level="max"), ZstdCodec())
    assert (config.codec, config.level, config.frame_size) == ("zstd-base", 19, SIZE_MODE_FRAME)
    assert (config.images[0].encoders, config.images[0].policy) == (("raw",), "fixed")


def test_level_max_keeps_what_was_asked(tmp_path: Path) -> None:
    spec = ImageSpec("disk", tmp_path / "b", tmp_path / "m", encoders=("xor", "raw"), policy="best")
    config = size_mode(CreateConfig(output=tmp_path / "o", images=[spec], level="max", frame_size=2 << 20), ZstdCodec())
    assert config.images[0].encoders == ("xor", "raw") and config.frame_size == 2 << 20


def test_level_max_of_another_codec_is_its_highest_level(tmp_path: Path) -> None:
    assert size_mode(_config(tmp_path, codec="lzma", level="max"), REGISTRY.codec("lzma")).level == 9
    with pytest.raises(ConfigError, match="no levels"):
        size_mode(_config(tmp_path, codec="none", level="max"), REGISTRY.codec("none"))


def test_a_pipeline_asks_for_the_size_mode(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[overlay]\noutput = "o"\nlevel = "max"\n\n[[images]]\nkind = "disk"\nbase = "b"\nmodified = "m"\n')
    assert load_pipeline(path).level == "max"
    path.write_text(path.read_text().replace('"max"', '"most"'))
    with pytest.raises(ConfigError):
        load_pipeline(path)


def test_the_command_line_takes_max_and_refuses_other_words(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["create", "-o", "x", "--disk", "a", "b", "--level", "most"])
    assert exit_.value.code == 2 and "expected an integer or max" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# real data


@pytest.mark.fixtures
def test_the_realistic_disk_in_the_size_mode_is_smaller_and_rebuilds_exactly(realistic: Path, tmp_path: Path) -> None:
    base, modified = realistic / "base.img", realistic / "modified.img"
    sizes = {}
    for level in (None, "max"):
        overlay = tmp_path / f"{level}.vmdo"
        report = create_overlay(
            CreateConfig(output=overlay, images=[ImageSpec("disk", base, modified)], level=level, cache_dir=tmp_path),
            registry=REGISTRY,
        )
        sizes[level] = report.size
    assert sizes["max"] < 0.95 * sizes[None]
    out = tmp_path / "rebuilt.img"
    apply_overlay(
        ApplyConfig(overlay=tmp_path / "max.vmdo", images=[ApplyImageSpec("disk", base, out)], cache_dir=tmp_path),
        registry=REGISTRY,
    )
    assert files_identical(out, modified)
    with OverlayReader(tmp_path / "max.vmdo") as reader:
        assert reader.metadata["settings"]["codec"] == "zstd-base"
