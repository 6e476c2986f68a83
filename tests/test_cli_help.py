"""create --help tells the truth about this machine: the default encoders create really uses,
and the codecs installed here with their levels (a third-party one included)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from samples import write_pair

from vmdelta_core import registry as registry_module
from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.cli import main
from vmdelta_core.components import Codec, Encoder
from vmdelta_core.errors import PluginError
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.testing import registry_with

UNIT = 4096


class Tiny(Encoder):
    """An encoder that asks to be in the default list."""

    name = "tiny"
    default_priority = 5

    def encode(self, bases: Any, targets: Any) -> list[bytes | None]:
        return [None] * len(targets)

    def decode(self, bases: Any, payloads: Any, lengths: Any) -> list[bytes]:
        raise AssertionError("never encodes")


class Brotlish(Codec):
    """A third-party codec with levels of its own."""

    name = "brotlish"
    default_level = 4
    level_range = (1, 11)

    def compress(self, data: bytes, level: int | None) -> bytes:
        return bytes(data)

    def decompress(self, data: bytes, size: int) -> bytes:
        return bytes(data)


class ThirdParty:
    @hookimpl
    def vmdelta_register_encoders(self, register: Callable[[Encoder], None]) -> None:
        register(Tiny())

    @hookimpl
    def vmdelta_register_codecs(self, register: Callable[[Codec], None]) -> None:
        register(Brotlish())


def create_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main(["create", "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere


def test_create_help_names_the_default_encoders_and_the_installed_codecs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = registry_with(ThirdParty())
    monkeypatch.setattr(registry_module, "default_registry", lambda: registry)
    text = create_help(capsys)
    assert "default here: tiny,raw with --policy best" in text
    assert "default: raw" not in text
    assert "brotlish (levels 1 to 11, default 4)" in text
    assert "zstd (levels -131072 to 22, default 3)" in text
    assert "lzma (levels 0 to 9, default 6)" in text
    assert "none (no levels)" in text


def test_create_help_with_the_core_alone_names_raw(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = registry_with()
    monkeypatch.setattr(registry_module, "default_registry", lambda: registry)
    assert "default here: raw with --policy fixed" in create_help(capsys)


def test_the_default_encoders_the_help_names_are_the_ones_create_uses(tmp_path: Path) -> None:
    registry = registry_with(ThirdParty())
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, 8 * UNIT, dtype=np.uint8)
    modified = base.copy()
    modified[UNIT : 2 * UNIT] ^= 0x5A
    b, m = write_pair(tmp_path, "disk", base, modified)
    config = CreateConfig(output=tmp_path / "o", images=[ImageSpec("disk", b, m)], cache_dir=tmp_path / "c")
    create_overlay(config, registry=registry)
    with OverlayReader(tmp_path / "o") as reader:
        image = reader.metadata["images"][0]
    assert (tuple(image["encoders"]), image["policy"]) == (registry.default_encoders(), "best")


def test_help_is_still_shown_when_the_plugins_cannot_be_loaded(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Any:
        raise PluginError("an installed vmdelta plugin failed to import: no module named 'nope'")

    monkeypatch.setattr(registry_module, "default_registry", broken)
    assert "the installed components cannot be listed: an installed vmdelta plugin failed" in create_help(capsys)
