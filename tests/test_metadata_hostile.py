"""Hostile overlay metadata behind valid checksums: ``inspect`` (table and JSON) and ``apply`` end
in one FormatError line naming the field, exit status 3, never a traceback; and odd but valid
text is shown escaped."""

from __future__ import annotations

import contextlib
import copy
import json
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.cli import main
from vmdelta_core.errors import FormatError
from vmdelta_core.jsonvalue import MAX_DEPTH, decode_object, find_problem, path_text
from vmdelta_core.overlay.container import ENTRY_SIZE, TRAILER_SIZE, OverlayReader
from vmdelta_core.overlay.metadata import OverlayMetadata
from vmdelta_core.overlay.schema import TRAILER
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry
from vmdelta_core.testing import rewrite_overlay


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict[str, Any]]:
    """A small overlay of one disk, made with the builtins alone, and its metadata."""
    folder = tmp_path_factory.mktemp("overlay")
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, 8 * 4096, dtype=np.uint8)
    modified = base.copy()
    modified[4096:4200] ^= 1
    modified[3 * 4096 : 4 * 4096] = 0
    (folder / "base.img").write_bytes(base.tobytes())
    (folder / "modified.img").write_bytes(modified.tobytes())
    pm = new_plugin_manager(load_entry_points=False)
    create_overlay(
        CreateConfig(
            output=folder / "o.vmdo",
            images=[ImageSpec("disk", folder / "base.img", folder / "modified.img")],
            cache_dir=folder / "cache",
        ),
        registry=Registry(pm),
    )
    data = (folder / "o.vmdo").read_bytes()
    with OverlayReader(folder / "o.vmdo") as reader:
        metadata = reader.metadata
    metadata["images"][0]["filters"] = [
        {"name": "trim", "input": "t.log", "input_fingerprint": "ab12", "reason": "TRIMmed", "dropped": 0}
    ]
    return folder, data, metadata


def with_metadata_bytes(data: bytes, meta: bytes) -> bytes:
    """``data`` with its metadata block replaced by ``meta`` as it is (JSON Python would not write),
    every checksum recomputed."""
    trailer = TRAILER.parse(data[-TRAILER_SIZE:])
    index = data[trailer.index_offset : trailer.index_offset + trailer.index_count * ENTRY_SIZE]
    out = bytearray(data[: trailer.metadata_offset]) + meta
    index_offset = len(out)
    out += index
    out += struct.pack(
        ">QQQQQQ",
        trailer.metadata_offset,
        len(meta),
        xxhash.xxh3_64_intdigest(meta),
        index_offset,
        trailer.index_count,
        xxhash.xxh3_64_intdigest(index),
    )
    return bytes(out + xxhash.xxh3_64_intdigest(bytes(out)).to_bytes(8, "big") + b"VMDLTEND")


def refused_everywhere(capsys: pytest.CaptureFixture[str], folder: Path, overlay: bytes, fragment: str) -> None:
    """inspect, inspect --json and apply each print one line holding ``fragment`` and exit 3."""
    path = folder / "hostile.vmdo"
    path.write_bytes(overlay)
    commands = [
        ["inspect", str(path)],
        ["inspect", "--json", "--frames", str(path)],
        ["apply", "-q", str(path), "--disk", str(folder / "base.img"), str(folder / "out.img")],
    ]
    for argv in commands:
        code = main(argv)
        err = capsys.readouterr().err
        assert (code, err.count("\n")) == (3, 1), (argv[0], code, err)
        assert err.startswith("vmdelta: error: ") and fragment in err, err
    assert not (folder / "out.img").exists()


def edit(metadata: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    out = copy.deepcopy(metadata)
    change(out)
    return out


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """``_set("images.0.statistics.units", "many")``; ``...`` as the value deletes the key."""

    def change(metadata: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = metadata
        for part in parents:
            node = node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return change


HOSTILE = [
    # the two inspect tracebacks of the reliability issue
    ("images.0.filters.0.reason", ..., "images[0].filters[0] lacks 'reason'"),
    ("images.0.statistics", [1, 2], "images[0].statistics is an array, not an object"),
    ("images.0.statistics", "none", "images[0].statistics is a string, not an object"),
    # every field inspect's table reads
    ("images.0.statistics.units", "many", "images[0].statistics.units is a string, not an integer"),
    ("images.0.statistics.changed", -1, "images[0].statistics.changed = -1 is out of range"),
    ("images.0.statistics.stored_bytes", 1.5, "images[0].statistics.stored_bytes is a number, not an integer"),
    ("images.0.statistics.zero", True, "images[0].statistics.zero is a boolean, not an integer"),
    ("images.0.statistics.references_stored_bytes", 2**63, "references_stored_bytes = 9223372036854775808 is out"),
    ("images.0.statistics.dropped", [], "images[0].statistics.dropped is an array, not an object"),
    ("images.0.statistics.dropped", None, "images[0].statistics.dropped is null, not an object"),
    ("images.0.statistics.self", None, "images[0].statistics.self is null, not an integer"),
    ("images.0.filters.0.details", None, "images[0].filters[0].details is null, not an object"),
    ("unit_size", ..., "overlay metadata: the document lacks 'unit_size'"),
    ("images.0.statistics.dropped", {"trim": "7"}, "images[0].statistics.dropped.trim is a string, not an integer"),
    ("images.0.statistics.dropped", {"\x1b[2J": 1}, "statistics.dropped has a key that is not a one-line name"),
    ("images.0.statistics.encoders", {"raw": 3}, "images[0].statistics.encoders.raw is an integer, not an object"),
    ("images.0.statistics.encoders", {"raw": {"bytes": 1}}, "images[0].statistics.encoders.raw lacks 'units'"),
    ("images.0.statistics.encoders", {"raw": {"units": 1, "bytes": None}}, "encoders.raw.bytes is null, not an"),
    ("images.0.filters", {}, "images[0].filters is an object, not an array"),
    ("images.0.filters.0", "trim", "images[0].filters[0] is a string, not an object"),
    ("images.0.filters.0.dropped", "7", "images[0].filters[0].dropped is a string, not an integer"),
    ("images.0.filters.0.input", 7, "images[0].filters[0].input is an integer, not a string or null"),
    ("images.0.filters.0.name", "", "images[0].filters[0].name is not a one-line name"),
    ("images.0.filters.0.runs", "x", "images[0].filters[0].runs is a string, not an array"),
    ("images.0.filters.0.runs", [[0, 1]], "images[0].filters[0].runs counts other units than the 0 dropped"),
    ("images.0.filters.0.runs", [[5, 0]], "images[0].filters[0].runs is not a list of sorted, separate"),
    ("images.0.filters.0.runs", [[2, 1], [1, 1]], "images[0].filters[0].runs is not a list of sorted, separate"),
    ("images.0.filters.0.runs", [[1, 1], [2, 1]], "images[0].filters[0].runs is not a list of sorted, separate"),
    ("images.0.filters.0.runs", [["1", 1]], "images[0].filters[0].runs is not a list of sorted, separate"),
    ("images.0.filters.0.runs", [[True, 1]], "images[0].filters[0].runs is not a list of sorted, separate"),
    ("images.0.name", "disk0\n", "images[0].name is not a one-line name"),
    ("images.0.name", "x" * 300, "images[0].name is not a one-line name of 1 to 255 characters"),
    ("images.0.source", None, "images[0].source is null, not a string"),
    ("images.0.size", True, "images[0].size is a boolean, not an integer"),
    ("images.0.size", 1 << 52, "images[0].size = 4503599627370496 is out of range"),
    ("images.0.kind", "tape", "images[0].kind is 'tape', not one of memory, disk"),
    ("images.0.layout", [], "images[0].layout is an array, not an object"),
    ("images.0.envelope", {"length": "1"}, "images[0].envelope.length is a string, not an integer"),
    ("images.0.artifact_digest", 5, "images[0].artifact_digest is an integer, not a string or null"),
    ("images.0.base", "base.img", "images[0].base is a string, not an object"),
    ("images.0.base.size", -1, "images[0].base.size = -1 is out of range"),
    ("images.0.base.fingerprint", ..., "images[0].base lacks 'fingerprint'"),
    ("images.0", ["disk"], "images[0] is an array, not an object"),
    ("images", {"0": {}}, "images is an object, not an array"),
    ("images", [], "lists no images"),
    ("components", "zstd", "components is a string, not an array"),
    ("components.0.kind", "gizmo", "components[0].kind is 'gizmo', not one of codec, encoder, source, filter"),
    ("components.0.id", 256, "components[0].id = 256 is out of range (0 to 255)"),
    ("components.0.id", "0", "components[0].id is a string, not an integer"),
    ("components.0.version", 1, "components[0].version is an integer, not a string"),
    ("unit_size", 4096.0, "unit_size is a number, not an integer"),
    ("unit_size", 4097, "unit_size 4097 is not a multiple of 512"),
    ("version", True, "does not describe a version 1 vmdelta overlay"),
    ("version", 1.0, "does not describe a version 1 vmdelta overlay"),
    ("settings", json.loads("[" * 100 + "]" * 100), f"settings[0][0][0][0]...[0][0] is nested more than {MAX_DEPTH}"),
    ("creator", {"n": 2**70}, "creator.n is a number beyond 64 bits"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), HOSTILE, ids=[f"{p}={str(v)[:20]}" for p, v, _ in HOSTILE])
def test_hostile_metadata_is_one_format_error(
    path: str, value: Any, fragment: str, made: tuple[Path, bytes, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, data, metadata = made
    hostile = edit(metadata, _set(path, value))
    with pytest.raises(FormatError) as caught:
        OverlayMetadata.from_json(hostile)
    assert fragment in str(caught.value)
    refused_everywhere(capsys, folder, rewrite_overlay(data, metadata=hostile), fragment)


def test_duplicate_and_reserved_component_ids_are_refused(made: tuple[Path, bytes, dict[str, Any]]) -> None:
    _, _, metadata = made
    codec = next(c for c in metadata["components"] if c["kind"] == "codec")
    encoder = next(c for c in metadata["components"] if c["kind"] == "encoder")
    with pytest.raises(FormatError, match=r"components\[\d+\].id 0 names a second codec"):
        OverlayMetadata.from_json({**metadata, "components": [*metadata["components"], dict(codec, name="lzma")]})
    with pytest.raises(FormatError, match=r"ref 0x1 names a second encoder"):
        OverlayMetadata.from_json({**metadata, "components": [*metadata["components"], dict(encoder, name="other")]})
    with pytest.raises(FormatError, match=r"ref 0x6 is reserved for references"):
        OverlayMetadata.from_json({**metadata, "components": [*metadata["components"], dict(encoder, name="z", ref=6)]})


def test_what_create_writes_passes_and_odd_text_is_shown_escaped(
    made: tuple[Path, bytes, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, data, metadata = made
    OverlayMetadata.from_json(metadata)
    odd = edit(metadata, _set("images.0.filters.0.reason", "[/red] \x1b]0;pwned\x07 :smile:"))
    odd = edit(odd, _set("images.0.filters.0.input", "t\udcff.log"))
    path = folder / "odd.vmdo"
    path.write_bytes(rewrite_overlay(data, metadata=odd))
    assert main(["inspect", "--frames", str(path)]) == 0
    out = capsys.readouterr().out
    assert "([/red] \\x1b]0;pwned\\x07 :smile:)" in out and "t\\udcff.log ab12" in out and "\x1b" not in out
    assert main(["inspect", "--json", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)["metadata"]["images"][0]["filters"][0]
    assert shown["reason"] == "[/red] \x1b]0;pwned\x07 :smile:" and shown["input"] == "t\udcff.log"


# --------------------------------------------------------------------------------------------
# JSON Python itself cannot take: numbers past 4300 digits, nesting past the recursion limit
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def any_int_digits() -> Iterator[None]:
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(previous)


def huge_number(metadata: dict[str, Any]) -> bytes:
    with any_int_digits():
        hostile = edit(metadata, _set("images.0.statistics.units", 10**5000))
        return json.dumps(hostile, sort_keys=True, separators=(",", ":")).encode()


def deep_nesting(metadata: dict[str, Any], depth: int = 100_000) -> bytes:
    text = json.dumps(edit(metadata, _set("settings", "@")), sort_keys=True, separators=(",", ":"))
    return text.replace('"settings":"@"', '"settings":' + "[" * depth + "]" * depth).encode()


def test_decode_object_bounds_numbers_and_nesting(made: tuple[Path, bytes, dict[str, Any]]) -> None:
    _, _, metadata = made
    with pytest.raises(FormatError, match=r"^m: images\[0\].statistics.units is a number of 5001 digits$"):
        decode_object(huge_number(metadata), "m")
    with pytest.raises(FormatError, match=f"^m is nested more than {MAX_DEPTH} levels deep$"):
        decode_object(deep_nesting(metadata), "m")
    with pytest.raises(FormatError) as caught:
        decode_object(deep_nesting(metadata, 500), "m")
    assert str(caught.value) == f"m: settings[0][0][0][0]...[0][0] is nested more than {MAX_DEPTH} levels deep"
    with pytest.raises(FormatError, match=r"^m is not UTF-8"):
        decode_object(b'{"a": "\xff"}', "m")
    with pytest.raises(FormatError, match=r"^m is not valid JSON"):
        decode_object(b'{"a": ', "m")
    with pytest.raises(FormatError, match=r"^m is not a JSON object"):
        decode_object(b"[1]", "m")
    assert decode_object(json.dumps(metadata).encode(), "m") == metadata
    assert decode_object(b'{"n": -9223372036854775808, "m": 18446744073709551615}', "m")["m"] == 2**64 - 1


def test_find_problem_walks_without_recursion() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    assert find_problem({"a": deep}) == (("a", *[0] * 63), f"is nested more than {MAX_DEPTH} levels deep")
    assert find_problem({"a": deep}, max_depth=200_000) is None
    assert find_problem({"a": {"b c": [1, 2**64]}}) == (("a", "b c", 1), "is a number beyond 64 bits")
    assert find_problem({"a": (1, {2: 3})}) == (("a", 1), "has a key of type int, not a string")
    assert find_problem({"a": {1, 2}}) == (("a",), "is a set, not a string, number, boolean or null")
    assert find_problem({"a": object()}) == (("a",), "is an object, not a string, number, boolean or null")


def test_paths_read_as_in_json_and_in_json_schema() -> None:
    assert path_text(("images", 0, "size")) == "images[0].size"
    assert path_text(("images", 0, "size"), slashes=True) == "images/0/size"
    assert path_text(("a", "b c", "ok")) == "a['b c'].ok"
    assert path_text(()) == ""
    assert path_text(("s", *[0] * 20)) == "s[0][0][0][0]...[0][0]"
    assert path_text(("s", *[0] * 20), slashes=True) == "s/0/0/0/0/.../0/0"
    assert find_problem({"a": {1, 2}}, scalars=None) is None


@pytest.mark.parametrize("hostile", [huge_number, deep_nesting], ids=["5000-digit number", "100k-deep arrays"])
def test_json_python_cannot_take_is_one_format_error(
    hostile: Callable[[dict[str, Any]], bytes],
    made: tuple[Path, bytes, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, data, metadata = made
    refused_everywhere(capsys, folder, with_metadata_bytes(data, hostile(metadata)), "overlay metadata")
