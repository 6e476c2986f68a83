"""One public surface for plugins: what plugin code and plugin tests may import of the core.

import-linter (the ``lint`` tox environment) checks the plugin packages; it cannot see their test
folders, so this test reads every ``.py`` under ``plugins/`` itself.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

import vmdelta_core
from vmdelta_core import plugin, testing

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"

#: what a plugin's code may import of the core
CODE_MAY_IMPORT = {"vmdelta_core.plugin"}
#: what a plugin's tests may import of the core
TESTS_MAY_IMPORT = {"vmdelta_core", "vmdelta_core.plugin", "vmdelta_core.testing"}


def core_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ``vmdelta_core`` in ``path``, at any depth, including
    ``importlib.import_module``/``pytest.importorskip`` of a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "vmdelta_core":  # `from vmdelta_core import plugin` is a submodule
                found += [(node.lineno, f"vmdelta_core.{a.name}") for a in node.names if _is_module(a.name)]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("import_module", "importorskip")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name.split(".")[0] == "vmdelta_core"]


def _is_module(name: str) -> bool:
    return (ROOT / "vmdelta_core" / f"{name}.py").exists() or (ROOT / "vmdelta_core" / name).is_dir()


def plugin_files() -> list[Path]:
    files = sorted(p for p in PLUGINS.glob("*/**/*.py") if ".egg-info" not in str(p) and "/build/" not in str(p))
    assert len({p.relative_to(PLUGINS).parts[0] for p in files}) >= 9, "the plugin folders were not found"
    return files


def is_test(path: Path) -> bool:
    return path.relative_to(PLUGINS).parts[1] in ("tests", "tools")


def test_plugins_import_only_the_public_surface() -> None:
    wrong = []
    for path in plugin_files():
        allowed = TESTS_MAY_IMPORT if is_test(path) else CODE_MAY_IMPORT
        wrong += [
            f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in core_imports(path) if name not in allowed
        ]
    assert not wrong, "plugins import core modules outside vmdelta_core.plugin/testing:\n" + "\n".join(wrong)


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import vmdelta_core.fileio\n"
        "from vmdelta_core.errors import FormatError\n"
        "from vmdelta_core import plugin, hookimpl\n"
        "def f():\n"
        "    from vmdelta_core.registry import Registry\n"
        "    cli = pytest.importorskip('vmdelta_core.cli')\n"
    )
    assert [name for _, name in core_imports(sample)] == [
        "vmdelta_core.fileio",
        "vmdelta_core.errors",
        "vmdelta_core",
        "vmdelta_core.plugin",
        "vmdelta_core.registry",
        "vmdelta_core.cli",
    ]


@pytest.mark.parametrize("module", [plugin, testing, vmdelta_core], ids=lambda m: m.__name__)
def test_every_public_name_resolves(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(module, name) is not None, name


def test_the_plugin_surface_is_documented_name_by_name() -> None:
    text = (ROOT / "docs" / "writing-plugins.md").read_text()
    section = text[text.index("## The public surface") :].split("\n## ")[0]
    documented = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            documented |= {name.strip(" `") for name in line.split("|")[1].split(",")}
    assert documented == set(plugin.__all__) | set(testing.__all__)


def test_the_importlinter_contracts_name_every_plugin_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    packages = {
        next(
            p.name
            for p in folder.iterdir()
            if p.name.startswith("vmdelta_") and p.is_dir() and "egg-info" not in p.name
        )
        for folder in PLUGINS.iterdir()
        if (folder / "pyproject.toml").exists()
    }
    assert set(config["root_packages"]) == {"vmdelta_core", *packages}
    for contract in config["contracts"]:
        named = set(contract.get("source_modules", [])) | set(contract.get("forbidden_modules", []))
        named |= set(contract.get("allowed_importers", []))
        if named & packages:
            assert packages <= named, f"contract {contract['name']!r} leaves out {sorted(packages - named)}"


def test_plugin_modules_import() -> None:
    for name in ("vmdelta_core.plugin", "vmdelta_core.testing", "vmdelta_core.testing_fixtures"):
        importlib.import_module(name)
