"""Start-up: importing the package loads none of the heavy libraries until a name that needs
them is used, and every public name still resolves to the object its module defines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vmdelta_core
from vmdelta_core.apply import synthesis
from vmdelta_core.config import ApplyConfig, ApplyImageSpec
from vmdelta_core.errors import ConfigError, FormatError

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
    monkeypatch.setattr(synthesis, "registry_of", lambda distributions: loaded.append(2))
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


APPLY_A_CORE_OVERLAY = """
import sys
from pathlib import Path
import numpy as np
from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.testing import registry_with

folder = Path(sys.argv[1])
base = np.arange(64 * 4096, dtype=np.uint32).astype(np.uint8)
modified = base.copy()
modified[4096:8192] = 7
(folder / "b").write_bytes(base.tobytes())
(folder / "m").write_bytes(modified.tobytes())
spec = ImageSpec("disk", folder / "b", folder / "m")
create_overlay(CreateConfig(folder / "o", [spec], cache_dir=folder / "c"), registry=registry_with())
apply_overlay(ApplyConfig(folder / "o", [ApplyImageSpec("disk", folder / "b", folder / "out")], cache_dir=folder / "c"))
assert (folder / "out").read_bytes() == modified.tobytes()
print(" ".join(sys.modules))
"""


def test_apply_loads_only_the_plugins_its_overlay_names(tmp_path: Path) -> None:
    """An overlay of the core's components alone: no installed plugin is imported to apply it."""
    run = subprocess.run(
        [sys.executable, "-c", APPLY_A_CORE_OVERLAY, str(tmp_path)], check=True, capture_output=True, text=True
    )
    plugins = [
        m for m in run.stdout.split() if m.startswith(("vmdelta_source_", "vmdelta_encoder_", "vmdelta_filter_"))
    ]
    assert plugins == []


def test_apply_falls_back_to_every_plugin_when_those_named_fall_short(tmp_path: Path, monkeypatch) -> None:
    from samples import sample_pair, write_pair

    from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
    from vmdelta_core.testing import registry_with

    base, modified = write_pair(tmp_path, "disk", *sample_pair(seed=2, units=24))
    config = CreateConfig(tmp_path / "o", [ImageSpec("disk", base, modified)], cache_dir=tmp_path / "c")
    create_overlay(config, registry=registry_with())
    # the plugins the overlay names lack its raw encoder (it moved): every plugin is loaded instead
    monkeypatch.setattr(synthesis, "registry_of", lambda d: registry_with(blocked=frozenset({"core-raw"})))
    monkeypatch.setattr(synthesis, "default_registry", registry_with)
    spec = ApplyImageSpec("disk", base, tmp_path / "out")
    synthesis.apply_overlay(ApplyConfig(tmp_path / "o", [spec], cache_dir=tmp_path / "c"))
    assert (tmp_path / "out").read_bytes() == modified.read_bytes()


def test_send_relays_a_stream_form_overlay_without_the_formats_readers() -> None:
    """``vmdelta send`` puts a stream's first byte on the wire before numpy or construct would load."""
    loaded = modules_after("import vmdelta_core.cli.send")
    assert not loaded & {"numpy", "construct", "zstandard", "pluggy", "vmdelta_core.overlay.container"}


def test_the_plain_header_layout_is_the_formats() -> None:
    from vmdelta_core.overlay.layout import FLAG_STREAM, HEADER_FIELDS, HEADER_SIZE, OVERLAY_MAGIC, read_header
    from vmdelta_core.overlay.schema import HEADER

    assert HEADER.sizeof() == HEADER_SIZE
    built = HEADER.build({"version": 1, "flags": FLAG_STREAM, "reserved": 0})
    assert built == HEADER_FIELDS.pack(OVERLAY_MAGIC, 1, FLAG_STREAM, 0)
    assert read_header(built, "x") is True
    assert read_header(HEADER.build({"version": 1, "flags": 0, "reserved": 0}), "x") is False
    for bad, message in (
        (b"\x89VMDELTB" + built[8:], "bad magic"),
        (built[:8] + b"\x00\x02" + built[10:], "version 2"),
    ):
        with pytest.raises(FormatError, match=message):
            read_header(bad, "x")


def test_the_program_exits_with_its_status_and_every_byte_written(tmp_path: Path) -> None:
    """``vmdelta`` leaves without tearing the interpreter down: its output, buffered to a file,
    is still whole, and its exit status is the command's."""
    listing = tmp_path / "plugins.json"
    with open(listing, "wb") as out:
        ok = subprocess.run([sys.executable, "-m", "vmdelta_core", "plugins", "--json"], stdout=out, check=False)
    assert ok.returncode == 0 and json.loads(listing.read_text())
    missing = subprocess.run(
        [sys.executable, "-m", "vmdelta_core", "apply", str(tmp_path / "none.vmdo"), "--disk", "a", "b"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == ConfigError.exit_code
    assert missing.stderr.startswith("vmdelta: error:") and missing.stderr.count("\n") == 1
