"""Start-up: importing the package loads none of the heavy libraries until a name that needs
them is used, and every public name still resolves to the object its module defines."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vmdelta_core
from vmdelta_core.apply import synthesis
from vmdelta_core.config import ApplyConfig, ApplyImageSpec
from vmdelta_core.errors import ConfigError

HEAVY = ("numpy", "zstandard", "pluggy", "attrs", "construct", "rich", "jsonschema", "xxhash")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter that runs ``code`` has loaded, and their top-level packages."""
    probe = f"{code}\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return {name for module in out.split() for name in (module, module.partition(".")[0])}


def test_importing_the_package_loads_no_heavy_library() -> None:
    loaded = modules_after("import vmdelta_core\nfrom vmdelta_core import VmdeltaError, ConfigError")
    assert not loaded & set(HEAVY)


def test_a_name_is_loaded_with_its_module_when_first_used() -> None:
    loaded = modules_after("from vmdelta_core import Source")
    assert "numpy" in loaded and "zstandard" not in loaded


def test_every_public_name_resolves_to_its_module_object() -> None:
    import vmdelta_core.api as api
    import vmdelta_core.components as components
    import vmdelta_core.errors as errors
    import vmdelta_core.hookspecs as hookspecs
    import vmdelta_core.registry as registry

    for name in vmdelta_core.__all__:
        value = getattr(vmdelta_core, name)
        homes = [m for m in (api, components, errors, hookspecs, registry) if getattr(m, name, None) is value]
        assert homes, name


def test_apply_reads_its_overlay_before_it_loads_the_plugins(tmp_path, monkeypatch) -> None:
    """The first work (opening and checking the overlay) does not wait for every plugin."""
    loaded = []
    monkeypatch.setattr(synthesis, "default_registry", lambda: loaded.append(1))
    (tmp_path / "base.img").write_bytes(bytes(4096))
    spec = ApplyImageSpec("disk", tmp_path / "base.img", tmp_path / "out.img")
    with pytest.raises(ConfigError, match="does not exist"):
        synthesis.apply_overlay(ApplyConfig(tmp_path / "missing.vmdo", [spec]))
    assert not loaded


def test_the_api_loads_a_pipeline_only_when_it_is_asked_for() -> None:
    loaded = modules_after("import vmdelta_core.api\nfrom vmdelta_core.api import ApplyConfig, apply_overlay")
    assert "vmdelta_core.apply" in loaded
    assert not loaded & {"vmdelta_core.create", "vmdelta_core.batch", "vmdelta_core.interop"}


def test_every_name_of_the_api_resolves() -> None:
    import vmdelta_core.api as api

    for name in api.__all__:
        assert getattr(api, name).__name__ == name
