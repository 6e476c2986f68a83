"""Pipeline configuration: a TOML pipeline becomes the CreateConfig the command line would build,
with paths relative to the pipeline; a wrong one is one ConfigError line naming the field.

Bounds and types of every field, codec levels and component options are in
test_config_hostile.py; this file covers what a well-meaning pipeline author relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmdelta_core.config import (
    DEFAULT_FRAME,
    DEFAULT_UNIT,
    CreateConfig,
    FilterSpec,
    ImageSpec,
    describe_config,
    load_pipeline,
    parse_filter,
    parse_option,
)
from vmdelta_core.errors import ConfigError

DISK = '[[images]]\nkind = "disk"\nbase = "base.img"\nmodified = "modified.img"\n'


def write(folder: Path, text: str, name: str = "vm.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# load_pipeline: what it builds
# --------------------------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_pipeline_not_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "vm"
    path = write(
        folder,
        '[overlay]\noutput = "out/vm.overlay"\ncache_dir = "../cache"\n\n'
        '[[images]]\nkind = "disk"\nbase = "disks/base.img"\nmodified = "/abs/modified.img"\n'
        'filters = ["trim:logs/trim.log", { name = "xray", input = "journal.bin" }, "plain"]\n',
    )
    monkeypatch.chdir(tmp_path)
    config = load_pipeline(path)
    assert config.output == folder / "out" / "vm.overlay"
    assert config.cache_dir == folder / ".." / "cache"
    image = config.images[0]
    assert image.base == folder / "disks" / "base.img"
    assert image.modified == Path("/abs/modified.img")
    assert [(f.name, f.input) for f in image.filters] == [
        ("trim", folder / "logs" / "trim.log"),
        ("xray", folder / "journal.bin"),
        ("plain", None),
    ]


def test_a_pipeline_given_by_a_relative_name_finds_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "vm", f'[overlay]\noutput = "o.vmdo"\n\n{DISK}')
    monkeypatch.chdir(tmp_path)
    config = load_pipeline(Path("vm/vm.toml"))
    assert config.images[0].base.resolve() == (tmp_path / "vm" / "base.img").resolve()
    assert config.output.resolve() == (tmp_path / "vm" / "o.vmdo").resolve()


def test_a_home_relative_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "p", f'[overlay]\noutput = "~/vm.overlay"\n\n{DISK}')
    assert load_pipeline(path).output == tmp_path / "home" / "vm.overlay"


def test_every_setting_is_carried_over(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[overlay]\noutput = "o"\nunit_size = 8192\ncodec = "lzma"\nlevel = 6\nframe_size = 2097152\n'
        "threads = 3\nencoder_options = { xdelta3 = { level = 9, window = [1, 2] } }\n\n"
        '[[images]]\nkind = "memory"\nbase = "b.mem"\nmodified = "m.mem"\nformat = "qemu"\n'
        'encoders = ["xor", "raw"]\npolicy = "first-smaller"\n'
        'filters = [{ name = "freepfn", options = { strict = true } }]\n\n' + DISK,
    )
    config = load_pipeline(path)
    assert (config.unit_size, config.codec, config.level, config.frame_size, config.threads) == (
        8192,
        "lzma",
        6,
        2 << 20,
        3,
    )
    assert config.encoder_options == {"xdelta3": {"level": 9, "window": [1, 2]}}
    memory, disk = config.images
    assert (memory.kind, memory.format, memory.policy) == ("memory", "qemu", "first-smaller")
    assert memory.encoders == ("xor", "raw")
    assert memory.filters == (FilterSpec("freepfn", None, {"strict": True}),)
    assert disk.kind == "disk"


def test_what_a_pipeline_leaves_out_takes_the_command_line_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, f'[overlay]\noutput = "o"\n\n{DISK}')
    loaded = load_pipeline(path)
    image = ImageSpec("disk", tmp_path / "base.img", tmp_path / "modified.img")
    assert loaded == CreateConfig(output=tmp_path / "o", images=[image])
    assert (loaded.unit_size, loaded.codec, loaded.level) == (DEFAULT_UNIT, "zstd", None)
    assert loaded.frame_size == DEFAULT_FRAME
    assert (loaded.images[0].encoders, loaded.images[0].policy, loaded.images[0].format) == (None, None, None)


# --------------------------------------------------------------------------------------------
# load_pipeline: what it refuses, in one line naming the field
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (DISK, "top level: 'overlay' is a required property"),
        ('[overlay]\noutput = "o"\n', "top level: 'images' is a required property"),
        (f"[overlay]\n\n{DISK}", "overlay: 'output' is a required property"),
        (f'[overlay]\noutput = "o"\nthread = 3\n\n{DISK}', "overlay: Additional properties are not allowed ('thread'"),
        (
            '[overlay]\noutput = "o"\n[[images]]\nkind = "disk"\nbase = "b"\n',
            "images/0: 'modified' is a required property",
        ),
        (f'[overlay]\noutput = "o"\n\n{DISK}bsae = "x"\n', "images/0: Additional properties are not allowed ('bsae'"),
        (f'[overlay]\noutput = "o"\n\n{DISK}{DISK}kind = "tape"\n', None),  # a key given twice: not TOML
        (f'[overlay]\noutput = "o"\n\n{DISK}{DISK.replace("disk", "tape")}', "images/1/kind: 'tape' is not one of"),
        (f'[overlay]\noutput = "o"\n\n{DISK}filters = ["two words"]\n', "images/0/filters/0: 'two words' is not valid"),
        (
            f'[overlay]\noutput = "o"\n\n{DISK}filters = [{{ input = "x" }}]\n',
            "images/0/filters/0: {'input': 'x'} is not valid",
        ),
        (
            f'[overlay]\noutput = "o"\n\n{DISK.replace("disk", "memory")}{DISK.replace("disk", "memory")}',
            "a VM has one memory image; give --memory once",
        ),
    ],
)
def test_a_wrong_pipeline_is_one_line_naming_the_file_and_field(tmp_path: Path, text: str, message: str | None) -> None:
    path = write(tmp_path, text)
    got = refused(path)
    assert got.startswith(f"{path}: ")
    assert (message or "not valid TOML") in got


def test_a_pipeline_that_is_not_text_or_not_there_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_bytes(b'[overlay]\noutput = "\xff"\n')
    assert refused(path).startswith(f"{path}: not valid TOML: ")
    assert refused(tmp_path / "gone.toml") == f"pipeline {tmp_path / 'gone.toml'} does not exist"
    assert refused(tmp_path) == f"pipeline {tmp_path} is a directory; vmdelta reads only regular files"


def test_a_pipeline_too_large_to_be_one_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    with open(path, "wb") as f:
        f.truncate((16 << 20) + 1)  # sparse: nothing to write, and nothing is read
    assert refused(path) == f"pipeline {path} is larger than 16 MiB; no pipeline needs that"


# --------------------------------------------------------------------------------------------
# --filter and --encoder-option / --filter-option text
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("xray", FilterSpec("xray")),
        ("trim:trace.log", FilterSpec("trim", Path("trace.log"))),
        ("trim:/var/log/a:b.log", FilterSpec("trim", Path("/var/log/a:b.log"))),  # only the first colon splits
    ],
)
def test_parse_filter_splits_name_and_input(text: str, spec: FilterSpec) -> None:
    assert parse_filter(text) == spec


def test_parse_filter_needs_a_name() -> None:
    with pytest.raises(ConfigError, match=r"^--filter ':trace\.log': expected NAME or NAME:INPUT$"):
        parse_filter(":trace.log")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("xdelta3.window=1.5", ("xdelta3", "window", 1.5)),
        ("xray.journal=two words", ("xray", "journal", "two words")),  # not TOML: kept as text
        ("xray.expr=a=b", ("xray", "expr", "a=b")),  # only the first '=' splits
        ("xray.a.b=1", ("xray", "a.b", 1)),  # only the first '.' splits
        ("xray.list=[1,", ("xray", "list", "[1,")),
        ('xray.quoted="[1,"', ("xray", "quoted", "[1,")),
    ],
)
def test_parse_option_splits_name_key_and_value(text: str, parsed: tuple[str, str, object]) -> None:
    assert parse_option(text, "--encoder-option") == parsed


def test_a_value_holding_a_line_break_is_kept_whole_or_refused() -> None:
    try:
        parsed = parse_option("xdelta3.level=1\nwindow = 2", "--encoder-option")
    except ConfigError:
        return
    assert parsed == ("xdelta3", "level", "1\nwindow = 2")


@pytest.mark.parametrize("text", ["level=9", "xdelta3.level", "xdelta3.=9", ".level=9", ""])
def test_parse_option_refuses_what_is_not_name_key_value(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_option(text, "--filter-option")
    assert str(caught.value) == f"--filter-option {text!r}: expected NAME.KEY=VALUE"


# --------------------------------------------------------------------------------------------
# describe_config: what an overlay records of its settings
# --------------------------------------------------------------------------------------------


def test_describe_config_records_names_never_the_creators_folders(tmp_path: Path) -> None:
    secret = tmp_path / "home" / "alice" / "private-project"
    config = CreateConfig(
        output=secret / "vm.overlay",
        images=[
            ImageSpec(
                "disk",
                secret / "base.img",
                secret / "modified.img",
                encoders=("xor", "raw"),
                policy="best",
                filters=[FilterSpec("trim", secret / "trim.log", {"after": 0}), FilterSpec("xray")],
            ),
            ImageSpec("memory", secret / "base.mem", secret / "modified.mem", format="qemu"),
        ],
        level=5,
        cache_dir=secret / "cache",
        encoder_options={"xor": {"merge_gap": 4}},
    )
    settings = describe_config(config).to_json()  # what the overlay's metadata holds
    text = json.dumps(settings)
    assert "alice" not in text and str(tmp_path) not in text
    assert settings["level"] == 5 and settings["encoder_options"] == {"xor": {"merge_gap": 4}}
    disk, memory = settings["images"]
    assert (disk["base"], disk["modified"], disk["policy"]) == ("base.img", "modified.img", "best")
    assert disk["encoders"] == ["xor", "raw"]
    assert disk["filters"] == [
        {"name": "trim", "input": "trim.log", "options": {"after": 0}},
        {"name": "xray", "input": None, "options": {}},
    ]
    # defaults are recorded as asked, not as whatever the installed encoders made of them
    assert (memory["format"], memory["encoders"], memory["policy"]) == ("qemu", "default", "default")


def test_describe_config_is_the_same_wherever_the_files_live(tmp_path: Path) -> None:
    def described(folder: Path) -> dict[str, object]:
        config = CreateConfig(output=folder / "o", images=[ImageSpec("disk", folder / "b.img", folder / "m.img")])
        return describe_config(config).to_json()

    assert described(tmp_path / "one") == described(Path("/elsewhere/entirely"))
