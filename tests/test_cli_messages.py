"""What the command line tells a user is true: the digest apply prints, why a component is
missing and how to get it, what `vmdelta plugins` and `inspect` say of disabled plugins."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from samples import write_pair

from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.apply.bases import Decoders
from vmdelta_core.cli import main
from vmdelta_core.cli.commands import _show_apply, missing_components
from vmdelta_core.components import RebuiltImage, Source, SourceImage
from vmdelta_core.errors import PluginError
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.digest import file_digest
from vmdelta_core.overlay.metadata import ComponentRecord, OverlayMetadata
from vmdelta_core.testing import registry_with

UNIT = 4096


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# apply: the digest of what it states
# --------------------------------------------------------------------------------------------

HEADER = 64


class Headed(Source):
    """An artifact of a 64-byte header and then the image, as a VM snapshot has one."""

    name = "headed"

    def open(self, path: Path, *, kind: Any, options: Mapping[str, Any]) -> SourceImage:
        data = Path(path).read_bytes()
        return SourceImage(kind=kind, data=np.frombuffer(data, dtype=np.uint8)[HEADER:], envelope=data[:HEADER])

    def materialize(self, rebuilt: RebuiltImage, output: Path) -> None:
        with open(output, "wb") as f:
            f.write(rebuilt.envelope)
            f.write(Path(rebuilt.path).read_bytes())


class HeadedPlugin:
    @hookimpl
    def vmdelta_register_sources(self, register: Callable[[Source], None]) -> None:
        register(Headed())


def test_apply_prints_the_digest_of_the_artifact_it_says_is_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = registry_with(HeadedPlugin())
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, 16 * UNIT, dtype=np.uint8)
    changed = image.copy()
    changed[3 * UNIT : 4 * UNIT] = 7
    b, m = tmp_path / "base.vm", tmp_path / "modified.vm"
    b.write_bytes(b"H" * HEADER + image.tobytes())
    m.write_bytes(b"h" * HEADER + changed.tobytes())
    overlay, out = tmp_path / "o", tmp_path / "rebuilt.vm"
    spec = ImageSpec("disk", b, m, format="headed")
    create_overlay(CreateConfig(output=overlay, images=[spec], cache_dir=tmp_path / "c"), registry=registry)
    report = apply_overlay(
        ApplyConfig(overlay=overlay, images=[ApplyImageSpec("disk", b, out)], cache_dir=tmp_path / "c"),
        registry=registry,
    )
    _show_apply(report, argparse.Namespace(json=False, quiet=False))
    line = " ".join(capsys.readouterr().out.split())
    artifact, image_digest = file_digest(m), report.images[0].digest
    assert artifact != image_digest  # the header makes them differ
    assert f"artifact identical to the original ({artifact})" in line
    assert image_digest not in line
    assert out.read_bytes() == m.read_bytes()


# --------------------------------------------------------------------------------------------
# missing components: disabled or not installed, and what to do
# --------------------------------------------------------------------------------------------


def metadata_of(path: Path) -> OverlayMetadata:
    with OverlayReader(path) as reader:
        return OverlayMetadata.from_json(reader.metadata, reader.frames)


@pytest.fixture
def overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMDELTA_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, 8 * UNIT, dtype=np.uint8)
    modified = base.copy()
    modified[:100] = 1
    b, m = write_pair(tmp_path, "disk", base, modified)
    path = tmp_path / "vm.overlay"
    config = CreateConfig(output=path, images=[ImageSpec("disk", b, m, format="file", encoders=("raw",))])
    create_overlay(config, registry=registry_with())
    return path


def test_a_disabled_plugin_is_reported_as_installed_but_disabled(overlay: Path) -> None:
    meta = metadata_of(overlay)
    without_raw = registry_with(blocked=frozenset({"core-raw"}))
    with pytest.raises(PluginError) as caught:
        Decoders.find(meta, without_raw)
    message = str(caught.value)
    assert "needs the encoder 'raw' from vmdelta-core" in message
    assert "installed but disabled: take 'core-raw' out of VMDELTA_DISABLE_PLUGINS" in message
    assert "pip install" not in message


def test_remedies_for_a_component_not_installed_and_one_its_installed_distribution_lacks() -> None:
    registry = registry_with()
    assert registry.remedy("vmdelta-codec-brotli", "0.3") == "install it (pip install vmdelta-codec-brotli)"
    lacking = registry.remedy("vmdelta-core", "9.9")
    assert "vmdelta-core" in lacking and "is installed but does not provide it" in lacking
    assert "pip install 'vmdelta-core==9.9'" in lacking


def test_plugins_lists_the_disabled_ones(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDELTA_DISABLE_PLUGINS", "core-raw")
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "plugin core-raw (vmdelta-core) is installed but disabled by VMDELTA_DISABLE_PLUGINS" in " ".join(
        out.split()
    )


def test_inspect_marks_what_this_machine_lacks_and_how_to_get_it(
    overlay: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, "inspect", str(overlay))
    assert code == 0 and "MISSING" not in out and "missing here" not in out

    monkeypatch.setenv("VMDELTA_DISABLE_PLUGINS", "core-raw")
    code, out, _ = run(capsys, "inspect", str(overlay))
    assert code == 0 and "MISSING" in out
    assert "apply needs the encoder 'raw' (vmdelta-core" in " ".join(out.split())
    assert "take 'core-raw' out of VMDELTA_DISABLE_PLUGINS" in " ".join(out.split())
    code, out, _ = run(capsys, "inspect", "--json", str(overlay))
    (missing,) = json.loads(out)["missing"]
    assert (missing["kind"], missing["name"], missing["distribution"]) == ("encoder", "raw", "vmdelta-core")


def test_inspect_names_the_distribution_to_install(overlay: Path) -> None:
    meta = metadata_of(overlay)
    fancy = ComponentRecord("encoder", "fancy", "vmdelta-encoder-fancy", "1.2", ref=0xA)
    trim = ComponentRecord("filter", "trim", "vmdelta-filter-not-here", "1.0")
    lacking = missing_components(attrs.evolve(meta, components=[*meta.components, fancy, trim]), registry_with())
    assert [(m.name, m.remedy) for m in lacking] == [("fancy", "install it (pip install vmdelta-encoder-fancy)")]
