"""Start-up: importing the package loads none of the heavy libraries until a name that needs
them is used, and every public name still resolves to the object its module defines."""

from __future__ import annotations

import subprocess
import sys

import vmdelta_core

HEAVY = ("numpy", "zstandard", "pluggy", "attrs", "construct", "rich", "jsonschema", "xxhash")


def modules_after(code: str) -> set[str]:
    """The top-level modules loaded by a fresh interpreter that runs ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


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
