"""Configs that ask for something impossible: one ConfigError naming the field, from every way in
(TOML pipeline, command line, API), never a traceback from deep inside create, never a value
silently ignored. Codec levels, filter and source options are checked against the components."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from vmdelta_core import Codec, Filter, FilterResult, Source, hookimpl
from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, FilterSpec, ImageSpec, create_overlay
from vmdelta_core.builtin.codecs import LzmaCodec, NoneCodec, ZstdCodec
from vmdelta_core.cli import main
from vmdelta_core.components import SideFile
from vmdelta_core.config import (
    MAX_THREADS,
    check_codec_level,
    check_filter_options,
    check_side_files,
    check_source_options,
    describe_config,
    load_pipeline,
    parse_option,
    recorded_name,
)
from vmdelta_core.errors import ConfigError, PluginError
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, 8 * 4096, dtype=np.uint8)
    modified = base.copy()
    modified[5000:5100] ^= 0x5A
    b, m = tmp_path / "base.img", tmp_path / "modified.img"
    b.write_bytes(base.tobytes())
    m.write_bytes(modified.tobytes())
    return b, m


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> str:
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert err.startswith("vmdelta: error: ") and err.count("\n") == 1, err
    return err


def pipeline(folder: Path, overlay: str, images: str | None = None) -> Path:
    images = images or '[[images]]\nkind = "disk"\nbase = "base.img"\nmodified = "modified.img"\n'
    path = folder / "p.toml"
    path.write_text(f'[overlay]\noutput = "o.vmdo"\n{overlay}\n\n{images}')
    return path


# --------------------------------------------------------------------------------------------
# codec levels
# --------------------------------------------------------------------------------------------


def test_builtin_codecs_declare_their_real_level_range() -> None:
    assert ZstdCodec.level_range == (-(1 << 17), 22)
    assert LzmaCodec.level_range == (0, 9)
    assert NoneCodec.level_range is None
    data = b"vmdelta " * 1000
    for codec in (ZstdCodec(), LzmaCodec()):
        assert codec.level_range is not None
        for level in codec.level_range:  # both ends really compress
            assert codec.decompress(codec.compress(data, level), len(data)) == data


@pytest.mark.parametrize(
    ("codec", "level", "message"),
    [
        (ZstdCodec(), 999, "codec 'zstd' takes levels -131072 to 22; 999 is outside them"),
        (ZstdCodec(), -131073, "codec 'zstd' takes levels -131072 to 22; -131073 is outside them"),
        (LzmaCodec(), 50, "codec 'lzma' takes levels 0 to 9; 50 is outside them"),
        (LzmaCodec(), -1, "codec 'lzma' takes levels 0 to 9; -1 is outside them"),
        (NoneCodec(), 3, "codec 'none' has no levels; leave the level out (got 3)"),
        (ZstdCodec(), 1 << 63, "is outside them"),
    ],
)
def test_a_level_outside_the_codec_range_is_refused(codec: Codec, level: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_codec_level(codec, level)


def test_levels_in_range_and_no_level_pass() -> None:
    for codec, levels in ((ZstdCodec(), (-131072, -5, 0, 9, 22)), (LzmaCodec(), (0, 9)), (NoneCodec(), ())):
        check_codec_level(codec, None)
        for level in levels:
            check_codec_level(codec, level)


class ThirdPartyCodec(Codec):
    """A plugin's codec that would crash on a level it does not take."""

    name = "fussy"
    level_range: ClassVar[tuple[int, int] | None] = (1, 4)

    def compress(self, data: bytes, level: int | None) -> bytes:
        if level is not None and not 1 <= level <= 4:
            raise RuntimeError(f"fussy: level {level}")
        return bytes(data)

    def decompress(self, data: bytes, size: int) -> bytes:
        return bytes(data)


class FussyPlugin:
    @hookimpl
    def vmdelta_register_codecs(self, register: Callable[[Codec], None]) -> None:
        register(ThirdPartyCodec())


def test_a_codec_declaring_a_malformed_range_is_a_plugin_error() -> None:
    for bad in ((4, 1), (1,), [1, 4], (1.0, 4), (True, 4), "1-4"):
        codec = ThirdPartyCodec()
        codec.level_range = bad  # type: ignore[assignment]
        with pytest.raises(PluginError, match="declares level_range"):
            check_codec_level(codec, None)


def registry_with(*plugins: object) -> Registry:
    pm = new_plugin_manager(load_entry_points=False)
    for plugin in plugins:
        pm.register(plugin, name=type(plugin).__name__)
    return Registry(pm)


def test_a_third_party_codec_never_sees_a_level_outside_its_range(pair: tuple[Path, Path], tmp_path: Path) -> None:
    b, m = pair
    config = CreateConfig(
        output=tmp_path / "o", images=[ImageSpec("disk", b, m)], codec="fussy", level=7, cache_dir=tmp_path / "c"
    )
    with pytest.raises(ConfigError, match="codec 'fussy' takes levels 1 to 4; 7 is outside them"):
        create_overlay(config, registry=registry_with(FussyPlugin()))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--level", "999"], "codec 'zstd' takes levels -131072 to 22; 999 is outside them"),
        (["--codec", "lzma", "--level", "50"], "codec 'lzma' takes levels 0 to 9; 50 is outside them"),
        (["--codec", "none", "--level", "3"], "codec 'none' has no levels"),
    ],
)
def test_a_bad_level_on_the_command_line_is_one_line(
    flags: list[str], message: str, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b, m = pair
    argv = ["create", "-q", "-o", str(tmp_path / "o"), "--disk", str(b), str(m), "--cache-dir", str(tmp_path / "c")]
    assert message in one_line_error(capsys, argv + flags, 2)


def test_a_huge_level_in_a_pipeline_is_one_line(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = pipeline(pair[0].parent, "level = 9223372036854775807")
    assert "9223372036854775807 is outside them" in one_line_error(capsys, ["run", "-q", str(path)], 2)


# --------------------------------------------------------------------------------------------
# filter and source options
# --------------------------------------------------------------------------------------------


class JournalFilter(Filter):
    name = "journaled"
    kinds = frozenset({"disk"})
    option_names = frozenset({"journal", "strict"})

    def select(self, context: Any, candidates: np.ndarray) -> FilterResult:
        return FilterResult(np.zeros(candidates.shape, dtype=bool), "nothing is free")


class JournalPlugin:
    @hookimpl
    def vmdelta_register_filters(self, register: Callable[[Filter], None]) -> None:
        register(JournalFilter())


def test_unknown_filter_options_are_refused_by_name() -> None:
    check_filter_options(JournalFilter(), {"journal": "ignore", "strict": True})
    check_filter_options(JournalFilter(), {})
    with pytest.raises(ConfigError, match=r"filter 'journaled' has no option 'jurnal'; it takes: journal, strict"):
        check_filter_options(JournalFilter(), {"jurnal": "ignore"})
    with pytest.raises(ConfigError, match=r"has no options 'a', 'b'; it takes: journal, strict"):
        check_filter_options(JournalFilter(), {"b": 1, "a": 2, "journal": "x"})

    class Plain(Filter):
        name = "plain"

    with pytest.raises(ConfigError, match="filter 'plain' has no option 'x'; it takes no options"):
        check_filter_options(Plain(), {"x": 1})


def test_unknown_source_options_are_refused_by_name() -> None:
    class RamSource(Source):
        name = "ramful"
        option_names = frozenset({"ram"})

    check_source_options(RamSource(), {"ram": "base-ram.raw"}, "base_options of base.mem")
    with pytest.raises(
        ConfigError, match=r"base_options of base\.mem: source 'ramful' has no option 'rma'; it takes: ram"
    ):
        check_source_options(RamSource(), {"rma": "x"}, "base_options of base.mem")
    duck = type("Duck", (), {"name": "duck"})()  # a duck-typed source that declares nothing
    with pytest.raises(ConfigError, match="source 'duck' has no option 'ram'; it takes no options"):
        check_source_options(duck, {"ram": "x"}, "modified_options")


def test_side_files_a_source_does_not_have_are_refused_by_name() -> None:
    class RamSource(Source):
        name = "ramful"
        side_files = (SideFile("ram", "a RAM file"),)

    check_side_files(RamSource(), {"ram": Path("base-ram.raw")}, "base side files of base.mem")
    with pytest.raises(ConfigError, match=r"base\.mem: source 'ramful' has no side file 'rma'; it has: ram"):
        check_side_files(RamSource(), {"rma": Path("x")}, "base side files of base.mem")
    duck = type("Duck", (), {"name": "duck"})()
    with pytest.raises(ConfigError, match="source 'duck' has no side file 'ram'; it has none"):
        check_side_files(duck, {"ram": Path("x")}, "output side files")


def test_a_misspelt_filter_option_stops_create(pair: tuple[Path, Path], tmp_path: Path) -> None:
    b, m = pair
    spec = ImageSpec("disk", b, m, filters=[FilterSpec("journaled", options={"jurnal": "ignore"})])
    with pytest.raises(ConfigError, match="filter 'journaled' has no option 'jurnal'"):
        create_overlay(
            CreateConfig(output=tmp_path / "o", images=[spec], cache_dir=tmp_path / "c"),
            registry=registry_with(JournalPlugin()),
        )
    assert not (tmp_path / "o").exists()


def test_an_unknown_source_option_stops_create(pair: tuple[Path, Path], tmp_path: Path) -> None:
    b, m = pair
    spec = ImageSpec("disk", b, m, format="file", modified_options={"use_hint": False})
    with pytest.raises(ConfigError, match="source 'file' has no option 'use_hint'; it takes no options"):
        create_overlay(
            CreateConfig(output=tmp_path / "o", images=[spec], cache_dir=tmp_path / "c"), registry=registry_with()
        )
    assert not (tmp_path / "o").exists()


def test_an_unknown_source_option_stops_apply(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from vmdelta_core.api import apply_overlay

    b, m = pair
    registry = registry_with()  # the builtin file source alone, whatever plugins are installed
    create_overlay(
        CreateConfig(output=tmp_path / "o", images=[ImageSpec("disk", b, m)], cache_dir=tmp_path / "c"),
        registry=registry,
    )
    spec = ApplyImageSpec("disk", b, tmp_path / "out", base_options={"tmpdir": str(tmp_path)})
    with pytest.raises(ConfigError, match="source 'file' has no option 'tmpdir'; it takes no options"):
        apply_overlay(ApplyConfig(overlay=tmp_path / "o", images=[spec], cache_dir=tmp_path / "c"), registry=registry)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# TOML pipelines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ("unit_size = 4096.0", "overlay/unit_size: 4096.0 is not of type 'integer'"),
        ("frame_size = 4194304.0", "overlay/frame_size: 4194304.0 is not of type 'integer'"),
        ("threads = 2.0", "overlay/threads: 2.0 is not of type 'integer'"),
        ("level = 3.0", "overlay/level: 3.0 is not of type 'integer'"),
        ("level = true", "overlay/level: True is not of type 'integer'"),
        ("threads = 0", "overlay/threads: 0 is less than the minimum of 1"),
        (f"threads = {MAX_THREADS + 1}", f"overlay/threads: {MAX_THREADS + 1} is greater than the maximum"),
        ("unit_size = 1000", "overlay/unit_size: 1000 is not a multiple of 512"),
        ("frame_size = 9223372036854775807", "overlay/frame_size: 9223372036854775807 is greater than the maximum"),
        ("level = " + "9" * 5000, "p.toml holds a number too large to read"),
        ("level = " + "[" * 5000 + "]" * 5000, "p.toml is nested more than 32 levels deep"),
        ("level = " + "[" * 40 + "]" * 40, "p.toml: overlay/level/0/0/0/.../0/0 is nested more than 32 levels deep"),
        ("encoder_options = { xor = { x = " + "[" * 40 + "]" * 40 + " } }", "/.../0/0 is nested more than 32 levels"),
        (
            "encoder_options = { xor = { when = 1979-05-27 } }",
            "encoder_options.xor.when is a date, not a string, number, boolean or null",
        ),
        (
            "encoder_options = { xor = { x = " + "[" * 20 + "]" * 20 + " } }",
            "encoder_options.xor.x[0][0][0][0]...[0][0] is nested more than 16 levels deep",
        ),
        ('output = "a\\u0000b"', "holds a NUL character"),
        ('cache_dir = "~no-such-user-here/x"', "no such user"),
    ],
)
def test_a_bad_overlay_table_is_a_config_error(
    overlay: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.toml"
    head = "" if overlay.startswith("output") else 'output = "o.vmdo"\n'
    path.write_text(
        f'[overlay]\n{head}{overlay}\n\n[[images]]\nkind = "disk"\nbase = "base.img"\nmodified = "modified.img"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    assert message in str(caught.value)
    assert message in one_line_error(capsys, ["run", "-q", str(path)], 2)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("base_sides = { ram = 3 }", "base_sides/ram: 3 is not of type 'string'"),
        ('modified_sides = { ram = "a\\u0000b" }', "holds a NUL character"),
        (
            'filters = [{ name = "trim", options = { after = 1979-05-27T07:32:00 } }]',
            "filter options.after is a datetime",
        ),
        ('filters = [{ name = "trim", options = { after = 1.5e999 } }]', None),
        ('encoders = ["xor", ""]', "images/0/encoders/1: '' should be non-empty"),
    ],
)
def test_a_bad_image_table_is_a_config_error(image: str, message: str | None, tmp_path: Path) -> None:
    path = pipeline(tmp_path, "", f'[[images]]\nkind = "disk"\nbase = "b"\nmodified = "m"\n{image}\n')
    if message is None:  # infinity is a JSON value to Python; the filter judges it
        load_pipeline(path)
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_pipeline(path)


def test_a_pipeline_just_inside_the_bounds_loads(tmp_path: Path) -> None:
    deep = "[" * 13 + "1" + "]" * 13  # options table, its key, and 13 arrays: 15 levels of 16
    config = load_pipeline(
        pipeline(tmp_path, f"threads = {MAX_THREADS}\nencoder_options = {{ xor = {{ x = {deep} }} }}")
    )
    assert config.threads == MAX_THREADS
    assert config.encoder_options["xor"]["x"] == eval(deep)


# --------------------------------------------------------------------------------------------
# the API: the same checks, whoever builds the config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads 0 is out of range (1 to 1024)"),
        ({"threads": MAX_THREADS + 1}, "threads 1025 is out of range"),
        ({"threads": 2.0}, "threads must be an integer, not float 2.0"),
        ({"unit_size": 4096.0}, "unit size must be an integer, not float 4096.0"),
        ({"unit_size": True}, "unit size must be an integer, not bool True"),
        ({"unit_size": 70000}, "unit size 70000 is out of range (512 to 65024)"),
        ({"unit_size": 1000}, "unit size 1000 must be a multiple of 512"),
        ({"frame_size": 1}, "frame size 1 is out of range"),
        ({"level": True}, "level must be an integer, not bool True"),
        ({"level": "9"}, "level must be an integer, not str '9'"),
        ({"level": 1 << 64}, "level 18446744073709551616 is out of range"),
        ({"codec": ""}, "a codec name must be a non-empty string"),
        ({"encoder_options": {"xor": {"t": datetime.date(2024, 1, 1)}}}, "encoder_options.xor.t is a date"),
        ({"encoder_options": {"xor": {"n": 10**30}}}, "encoder_options.xor.n is a number beyond 64 bits"),
        ({"encoder_options": {"xor": {1: 2}}}, "encoder_options.xor has a key of type int, not a string"),
        ({"encoder_options": {"xor": 3}}, "encoder_options.xor must be a table of options, not int 3"),
        ({"encoder_options": ["xor"]}, "encoder_options must map names to options"),
        ({"images": None}, "images must be a list, not NoneType None"),
        ({"images": ["disk"]}, "an image must be an ImageSpec, not str 'disk'"),
        ({"output": "a\0b"}, "holds a NUL character"),
        ({"output": 3}, "a path must be a string, not int 3"),
    ],
)
def test_create_config_refuses_what_create_cannot_do(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"output": "o", "images": [ImageSpec("disk", "b", "m")], **kwargs}
    with pytest.raises(ConfigError) as caught:
        CreateConfig(**fields)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ImageSpec("tape", "b", "m"), "image kind must be one of memory, disk, not str 'tape'"),
        (lambda: ImageSpec("disk", "b", "m", policy="smallest"), "policy must be one of fixed, first-smaller, best"),
        (lambda: ImageSpec("disk", "b", "m", encoders="xor"), "encoders must be a list of one or more names, not str"),
        (
            lambda: ImageSpec("disk", "b", "m", encoders=()),
            "encoders must be a list of one or more names, not tuple ()",
        ),
        (lambda: ImageSpec("disk", "b", "m", encoders=["xor", 3]), "an encoder name must be a non-empty string"),
        (lambda: ImageSpec("disk", "b", "m", filters=["trim"]), "a filter must be a FilterSpec, not str 'trim'"),
        (lambda: ImageSpec("disk", "b", "m", base_sides={"ram": 3}), "base_sides.ram must be a file name"),
        (
            lambda: FilterSpec("trim", options={"x": object()}),
            "filter options.x is an object, not a string, number, boolean or null",
        ),
        (lambda: FilterSpec(""), "a filter name must be a non-empty string"),
        (lambda: ApplyImageSpec("tape", "b", "o"), "image kind must be one of memory, disk"),
        (lambda: ApplyImageSpec("memory", "b", "o", output_sides={"ram": "\0"}), "NUL character"),
        (lambda: ApplyConfig(overlay="o", images=[], threads=0), "threads 0 is out of range (1 to 1024)"),
        (lambda: ApplyConfig(overlay="o", images=[], strict="no"), "strict must be true or false, not str 'no'"),
        (lambda: ApplyConfig(overlay="o", images=[("disk", "b", "o")]), "an image must be an ApplyImageSpec"),
    ],
)
def test_specs_refuse_what_they_cannot_mean(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build()
    assert message in str(caught.value)


def test_the_default_thread_count_stays_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 4096)
    assert CreateConfig(output="o", images=[ImageSpec("disk", "b", "m")]).threads == MAX_THREADS
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert ApplyConfig(overlay="o", images=[]).threads == 1


# --------------------------------------------------------------------------------------------
# --encoder-option / --filter-option values
# --------------------------------------------------------------------------------------------


def test_option_values_parse_as_toml_within_bounds() -> None:
    assert parse_option("xdelta3.level=9", "--encoder-option") == ("xdelta3", "level", 9)
    assert parse_option("xray.journal=ignore", "--filter-option") == ("xray", "journal", "ignore")
    assert parse_option("x.list=[1, [2]]", "--encoder-option") == ("x", "list", [1, [2]])
    with pytest.raises(ConfigError, match=r"^--encoder-option x\.level holds a number too large to read$"):
        parse_option("x.level=" + "9" * 5000, "--encoder-option")
    with pytest.raises(ConfigError, match=r"^--encoder-option x\.level is nested more than 32 levels deep$"):
        parse_option("x.level=" + "[" * 5000 + "]" * 5000, "--encoder-option")
    with pytest.raises(
        ConfigError,
        match=r"^--filter-option x\.level\[0\]\[0\]\[0\]\[0\]\.\.\.\[0\]\[0\] is nested more than 16 levels deep$",
    ):
        parse_option("x.level=" + "[" * 100 + "]" * 100, "--filter-option")
    with pytest.raises(ConfigError, match="beyond 64 bits"):
        parse_option("x.level=99999999999999999999999", "--encoder-option")


def test_a_huge_option_on_the_command_line_is_one_line(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b, m = pair
    argv = ["create", "-q", "-o", str(tmp_path / "o"), "--disk", str(b), str(m), "--encoder-option"]
    one_line_error(capsys, [*argv, "raw.x=" + "[" * 3000 + "]" * 3000], 2)
    one_line_error(capsys, [*argv, "raw.x=1979-05-27"], 2)


# --------------------------------------------------------------------------------------------
# what the overlay records of a config
# --------------------------------------------------------------------------------------------


def test_file_names_that_are_not_utf8_are_recorded_escaped() -> None:
    odd = Path(b"/d/caf\xe9 \xff.img".decode(errors="surrogateescape"))
    assert recorded_name(odd) == "caf\\xe9 \\xff.img"
    assert recorded_name(Path("/d/café.img")) == "café.img"
    spec = ImageSpec("disk", odd, "m", filters=[FilterSpec("trim", odd)])
    settings = describe_config(CreateConfig(output="o", images=[spec]))
    # what OverlayWriter.finish does with the metadata: it must not fail at the end of a create
    text = json.dumps(settings.to_json(), ensure_ascii=False).encode()
    assert b"caf\\\\xe9 \\\\xff.img" in text


def test_create_and_apply_take_files_whose_names_are_not_utf8(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b, m = pair
    odd_b = tmp_path / b"base-\xff.img".decode(errors="surrogateescape")
    odd_m = tmp_path / b"modified-\xe9.img".decode(errors="surrogateescape")
    b.rename(odd_b)
    m.rename(odd_m)
    overlay, out = tmp_path / "o.vmdo", tmp_path / "out.img"
    cache = ["--cache-dir", str(tmp_path / "c")]
    assert main(["create", "-q", "-o", str(overlay), "--disk", str(odd_b), str(odd_m), *cache]) == 0
    assert main(["apply", "-q", str(overlay), "--disk", str(odd_b), str(out), *cache]) == 0
    assert out.read_bytes() == odd_m.read_bytes()
    assert main(["inspect", "--json", str(overlay)]) == 0
    assert '"base-\\\\xff.img"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "text",
    [
        # found by the pipeline fuzz test: a key holding a line break made a two-line error
        '[overlay]\noutput = "o"\nencoder_options = { xor = { "\\n" = ' + "[" * 40 + "]" * 40 + " } }\n"
        '[[images]]\nkind = "disk"\nbase = "b"\nmodified = "m"\n',
        '[overlay]\noutput = "o"\n[[images]]\nkind = "disk"\nbase = "b"\nmodified = "m"\n"x\\ny" = 1\n',
    ],
)
def test_an_error_about_an_odd_key_stays_on_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert "\n" not in message and ("'\\n'" in message or "'x\\ny'" in message)
