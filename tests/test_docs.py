"""docs/writing-plugins.md stays true: its hook reference matches hookspecs.py, its example
plugin is the one in docs/example-plugin, and that plugin works."""

from __future__ import annotations

import importlib
import inspect
import io
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from vmdelta_core import hookspecs
from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.cli.commands import plugin_rows
from vmdelta_core.cli.output import plugins_table
from vmdelta_core.plugins import BUILTIN_PLUGINS, installed_plugins, new_plugin_manager
from vmdelta_core.registry import Registry
from vmdelta_core.testing import check_encoder

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "writing-plugins.md"
EXAMPLE = ROOT / "docs" / "example-plugin" / "vmdelta-encoder-bytepatch"


def specs() -> dict[str, str]:
    out = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("vmdelta_"):
            sig = inspect.signature(fn)
            params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
            out[name] = f"def {name}({params}) -> {sig.return_annotation}"
    return out


def test_hook_reference_lists_every_hook_with_its_exact_signature() -> None:
    text = DOC.read_text()
    reference = text[text.index("## Hook reference") :]
    documented = {name: line for line, name in re.findall(r"^(def (vmdelta_\w+)\(.*)$", reference, flags=re.M)}
    assert documented == specs()
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("vmdelta_") and fn.vmdelta_spec["firstresult"]:
            section = reference[reference.index(f"### `{name}`") :]
            assert "*firstresult*" in section.split("###")[1]


@pytest.mark.parametrize(
    "relative", ["pyproject.toml", "vmdelta_encoder_bytepatch/__init__.py", "tests/test_bytepatch.py"]
)
def test_the_walkthrough_shows_the_example_files_verbatim(relative: str) -> None:
    assert (EXAMPLE / relative).read_text().rstrip() in DOC.read_text()


def test_the_example_plugin_works(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLE))
    try:
        module = importlib.import_module("vmdelta_encoder_bytepatch")
        check_encoder(module.BytePatchEncoder())
        pm = new_plugin_manager(load_entry_points=False)
        pm.register(module, name="bytepatch")
        registry = Registry(pm)
    finally:
        sys.path.remove(str(EXAMPLE))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 8 * 4096, dtype=np.uint8)
    modified = base.copy()
    modified[100:110] += 1
    (tmp_path / "b").write_bytes(base.tobytes())
    (tmp_path / "m").write_bytes(modified.tobytes())
    report = create_overlay(
        CreateConfig(
            output=tmp_path / "o",
            images=[
                ImageSpec("disk", tmp_path / "b", tmp_path / "m", encoders=("bytepatch", "raw"), policy="first-smaller")
            ],
            cache_dir=tmp_path / "c",
        ),
        registry=registry,
    )
    bytepatch = report.images[0].statistics.encoders["bytepatch"]
    assert (bytepatch.units, bytepatch.bytes) == (1, 14)
    apply_overlay(
        ApplyConfig(
            overlay=tmp_path / "o",
            images=[ApplyImageSpec("disk", tmp_path / "b", tmp_path / "out")],
            cache_dir=tmp_path / "c",
        ),
        registry=registry,
    )
    assert (tmp_path / "out").read_bytes() == modified.tobytes()


@pytest.fixture
def example_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The registry of a machine where the example plugin is installed as pip installs it (its
    dist-info with its name, version and entry point on the path) beside the core alone."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    points = project["entry-points"]["vmdelta"]
    (info / "entry_points.txt").write_text("[vmdelta]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    others = frozenset(installed_plugins()) - set(points) - set(BUILTIN_PLUGINS)
    return Registry(new_plugin_manager(blocked=others))


def documented_block(after: str) -> str:
    """The fenced block of docs/writing-plugins.md whose first line is ``after``, without it."""
    text = DOC.read_text()
    start = text.index(f"```\n{after}\n") + len(f"```\n{after}\n")
    return text[start : text.index("```", start)]


def test_the_documented_plugins_table_is_what_vmdelta_plugins_prints(example_installed: Registry) -> None:
    out = io.StringIO()
    Console(file=out, width=120, highlight=False, markup=False, emoji=False).print(
        plugins_table(plugin_rows(example_installed))
    )
    assert "vmdelta-encoder-bytepatch" in out.getvalue()
    assert documented_block("$ vmdelta plugins") == out.getvalue()
