"""Overlay metadata under the fuzz contract: hostile JSON, through the reader's checks and through
``vmdelta inspect``, ends in a result or a clean FormatError; what is accepted renders."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.cli import main
from vmdelta_core.cli.output import print_json, render_overlay
from vmdelta_core.errors import FormatError
from vmdelta_core.fuzzing import check_untrusted, fuzz_settings
from vmdelta_core.jsonvalue import decode_object
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.metadata import OverlayMetadata
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry
from vmdelta_core.testing import rewrite_overlay


def _made(folder: Path) -> tuple[Path, bytes, dict[str, Any]]:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, 6 * 4096, dtype=np.uint8)
    modified = base.copy()
    modified[100:200] ^= 7
    modified[2 * 4096 : 3 * 4096] = 0
    (folder / "b").write_bytes(base.tobytes())
    (folder / "m").write_bytes(modified.tobytes())
    create_overlay(
        CreateConfig(output=folder / "o", images=[ImageSpec("disk", folder / "b", folder / "m")], cache_dir=folder),
        registry=Registry(new_plugin_manager(load_entry_points=False)),
    )
    data = (folder / "o").read_bytes()
    with OverlayReader(folder / "o") as reader:
        metadata = reader.metadata
    metadata["images"][0]["filters"] = [
        {"name": "trim", "input": "t.log", "input_fingerprint": "ab", "reason": "TRIM", "dropped": 0, "details": {}}
    ]
    metadata["images"][0]["statistics"]["dropped"] = {"trim": 0}
    return folder, data, metadata


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict[str, Any]]:
    return _made(tmp_path_factory.mktemp("fuzz-metadata"))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, -1, 255, 256, 512, 4096, 65024, 2**52, 2**63, 2**64, 2**64 + 1]),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["", "memory", "disk", "disk0", "codec", "encoder", "zstd", "raw", "[/x]", "\x1b[2J", "\udcff"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the document a value sits."""
    out = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for k, child in enumerate(node):
            out += _paths(child, (*prefix, k))
    return out


@st.composite
def mutated(draw: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` with a few values replaced, deleted or added, anywhere in it."""
    doc = copy.deepcopy(metadata)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        places = _paths(doc)[1:]
        path = draw(st.sampled_from(places))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return doc


def _read_and_render(metadata: Any, capsys: pytest.CaptureFixture[str]) -> OverlayMetadata:
    meta = OverlayMetadata.from_json(metadata)
    # accepted: the table and the JSON of inspect must render it, whatever it holds
    render_overlay(meta, size=1234, frames=[])
    print_json({"metadata": metadata})
    capsys.readouterr()
    return meta


@fuzz_settings(200)
@given(data=st.data())
def test_fuzz_metadata_fields(made: tuple[Path, bytes, dict[str, Any]], capsys: Any, data: st.DataObject) -> None:
    hostile = data.draw(mutated(made[2]))
    result = check_untrusted("overlay metadata", lambda: _read_and_render(hostile, capsys))
    assert isinstance(result, OverlayMetadata | FormatError)


@fuzz_settings(200)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_metadata_bytes(raw: bytes) -> None:
    def parse() -> OverlayMetadata:
        return OverlayMetadata.from_json(decode_object(raw, "overlay metadata"))

    assert isinstance(check_untrusted("overlay metadata", parse), OverlayMetadata | FormatError)


@fuzz_settings(200)
@given(
    st.sampled_from(["[", '{"a":']),
    st.integers(min_value=1, max_value=3000),
    st.sampled_from(["1", "-" + "9" * 30, "9" * 4400, "1e999", '"x"', "[]"]),
)
def test_fuzz_metadata_nesting_and_numbers(opener: str, depth: int, leaf: str) -> None:
    closer = "]" if opener == "[" else "}"
    raw = (
        '{"format":"vmdelta-overlay","version":1,"settings":' + opener * depth + leaf + closer * depth + "}"
    ).encode()
    result = check_untrusted(
        "overlay metadata", lambda: OverlayMetadata.from_json(decode_object(raw, "overlay metadata"))
    )
    assert isinstance(result, FormatError)  # nothing else is in it


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_metadata_inspect(made: tuple[Path, bytes, dict[str, Any]], capsys: Any, data: st.DataObject) -> None:
    folder, overlay, metadata = made
    hostile = data.draw(mutated(metadata))
    path = folder / "hostile.vmdo"
    path.write_bytes(rewrite_overlay(overlay, metadata=hostile))
    for argv in (["inspect", "--frames", str(path)], ["inspect", "--json", str(path)]):
        code = check_untrusted("vmdelta inspect", lambda argv=argv: main(argv))
        out, err = capsys.readouterr()
        assert code in (0, 3), (code, err)
        assert code == 0 or (err.startswith("vmdelta: error: ") and err.count("\n") == 1), err
        assert "\x1b" not in out and "\x1b" not in err
