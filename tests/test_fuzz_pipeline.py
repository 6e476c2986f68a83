"""TOML pipelines under the fuzz contract: any text gives a CreateConfig or a clean VmdeltaError,
and whatever is accepted can be recorded in an overlay and read back."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vmdelta_core.config import MAX_THREADS, CreateConfig, describe_config, load_pipeline
from vmdelta_core.errors import ConfigError
from vmdelta_core.fuzzing import check_untrusted, fuzz_settings
from vmdelta_core.jsonvalue import decode_object

_VALID = """\
[overlay]
output = "vm.overlay"
level = 9
unit_size = 4096
encoder_options = { xor = { merge_gap = 4 } }

[[images]]
kind = "memory"
base = "base.mem"
modified = "modified.mem"
encoders = ["xor", "raw"]
policy = "best"
filters = ["freepfn:free-pfns.txt"]
base_sides = { ram = "base-ram.raw" }

[[images]]
kind = "disk"
base = "base.img"
modified = "modified.img"
filters = [{ name = "trim", input = "trim-trace.log", options = { after = 0 } }]
"""


def _string(text: str) -> str:
    # JSON's escapes are TOML's; but not ensure_ascii's surrogate pairs, and TOML wants DEL escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml(value: Any) -> str:
    """A value as TOML text, inline (arrays and inline tables), for any value hypothesis draws."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return "{ " + ", ".join(f"{_string(k)} = {_toml(v)}" for k, v in value.items()) + " }"


def _document(data: dict[str, Any]) -> str:
    overlay = data.get("overlay", {})
    lines = ["[overlay]", *(f"{_string(k)} = {_toml(v)}" for k, v in overlay.items())]
    for image in data.get("images", []):
        lines += ["", "[[images]]", *(f"{_string(k)} = {_toml(v)}" for k, v in image.items())]
    return "\n".join(lines) + "\n"


text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # TOML has no lone surrogates
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 511, 512, 4096, 4096 * 16, 65024, 65536, 1 << 26, MAX_THREADS, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([4096.0, 1.5, 0.0]),
    st.booleans(),
    text,
    st.sampled_from(
        ["", "a\x00b", "\udcff", "~nobody-here/x", "/", ".", "memory", "disk", "raw", "best", "zstd", "none"]
    ),
    st.dates(),
    st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)
#: arrays in arrays, around the bounds (16 levels in options, 32 in a pipeline)
nested = st.sampled_from([1, 12, 13, 14, 15, 16, 17, 28, 29, 30, 31, 32, 33, 60]).map(
    lambda n: json.loads("[" * n + "]" * n)
)
option_tables = st.dictionaries(text, values | nested, max_size=3)
#: values each field could well have, drawn as often as anything at all
plausible = {
    "unit_size": st.sampled_from([512, 4096, 65024]),
    "codec": st.sampled_from(["zstd", "lzma", "none"]),
    "level": st.integers(min_value=-5, max_value=22),
    "frame_size": st.sampled_from([65536, 1 << 22, 1 << 26]),
    "threads": st.integers(min_value=1, max_value=8),
    "cache_dir": st.just("cache"),
    "encoder_options": st.dictionaries(st.sampled_from(["xor", "raw", "zstd"]), option_tables, max_size=2),
    "format": st.sampled_from(["raw", "qcow2", "file"]),
    "encoders": st.lists(st.sampled_from(["xor", "raw", "zstd"]), min_size=1, max_size=3),
    "policy": st.sampled_from(["fixed", "first-smaller", "best"]),
    "filters": st.lists(
        st.one_of(
            st.sampled_from(["trim:t.log", "xray", "freepfn:p.txt"]),
            st.fixed_dictionaries({"name": st.sampled_from(["trim", "xray"])}, optional={"options": option_tables}),
        ),
        max_size=3,
    ),
    "base_options": option_tables,
    "base_sides": st.fixed_dictionaries({}, optional={"ram": st.just("ram.raw")}),
    "modified_options": option_tables,
}
overlay_keys = st.sampled_from(
    ["output", "unit_size", "codec", "level", "frame_size", "threads", "cache_dir", "encoder_options"]
)
image_keys = st.sampled_from(
    [
        "kind",
        "base",
        "modified",
        "format",
        "encoders",
        "policy",
        "filters",
        "base_options",
        "modified_options",
        "base_sides",
    ]
)


@st.composite
def pipelines(draw: Any) -> dict[str, Any]:
    """Mostly well-formed pipelines, some fields plausible and some anything at all."""

    def field(key: str) -> Any:
        if key in plausible and draw(st.integers(min_value=0, max_value=3)):
            return draw(plausible[key])
        return draw(values | nested)

    overlay: dict[str, Any] = {"output": "o.vmdo"}
    for key in draw(st.lists(overlay_keys, max_size=4, unique=True)):
        overlay[key] = field(key)
    images = []
    for n in range(draw(st.sampled_from([1, 1, 1, 2, 3, 0]))):
        kind = draw(st.sampled_from(["disk", "memory"])) if n == 0 else "disk"
        image: dict[str, Any] = {"kind": kind, "base": "b", "modified": "m"}
        for key in draw(st.lists(image_keys, max_size=3, unique=True)):
            image[key] = field(key)
        images.append(image)
    return {"overlay": overlay, "images": images}


def _accepted(config: CreateConfig) -> None:
    """What an accepted pipeline promises: values create can use, and settings an overlay records
    and reads back (describe_config is what create writes into the metadata)."""
    assert isinstance(config.unit_size, int) and 512 <= config.unit_size <= 65024 and config.unit_size % 512 == 0
    assert isinstance(config.threads, int) and 1 <= config.threads <= MAX_THREADS
    assert config.level is None or (isinstance(config.level, int) and not isinstance(config.level, bool))
    text = json.dumps({"settings": describe_config(config).to_json()}, sort_keys=True, separators=(",", ":"))
    decode_object(text.encode(), "recorded settings")


def _load(folder: Path, text: str) -> Any:
    path = folder / "p.toml"
    path.write_text(text, errors="surrogatepass")
    result = check_untrusted("pipeline toml", lambda: load_pipeline(path))
    if isinstance(result, CreateConfig):
        _accepted(result)
    else:
        assert isinstance(result, ConfigError), result
        assert "\n" not in str(result)
    return result


@fuzz_settings(150)
@given(st.text(max_size=400))
def test_fuzz_pipeline_any_text(tmp_path: Path, text: str) -> None:
    _load(tmp_path, text)


@fuzz_settings(150)
@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=len(_VALID)), st.text(max_size=8)), min_size=1, max_size=4)
)
def test_fuzz_pipeline_edits_of_a_valid_one(tmp_path: Path, edits: list[tuple[int, str]]) -> None:
    text = _VALID
    for at, insert in edits:
        text = text[:at] + insert + text[at + len(insert) :]
    _load(tmp_path, text)


@fuzz_settings(200)
@given(pipelines())
def test_fuzz_pipeline_structured(tmp_path: Path, data: dict[str, Any]) -> None:
    _load(tmp_path, _document(data))


def test_the_valid_pipeline_is_accepted(tmp_path: Path) -> None:
    config = _load(tmp_path, _VALID)
    assert isinstance(config, CreateConfig) and len(config.images) == 2
