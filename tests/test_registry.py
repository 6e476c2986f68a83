"""The registry: builtins through the hooks, in-test plugins, blocking, duplicates, missing plugins."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pluggy
import pytest

from vmdelta_core import Encoder, hookimpl
from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.errors import FormatError, PluginError
from vmdelta_core.hookspecs import hookspec
from vmdelta_core.plugins import blocked_plugins, new_plugin_manager
from vmdelta_core.registry import Registry, default_registry
from vmdelta_core.testing import check_encoder


class ReverseEncoder(Encoder):
    """A third-party encoder for tests: the unit reversed (always accepted)."""

    name = "reverse"

    def encode(self, bases: Sequence[memoryview], targets: Sequence[memoryview]) -> list[bytes | None]:
        return [bytes(t)[::-1] for t in targets]

    def decode(self, bases, payloads, lengths) -> list[bytes]:
        if any(len(p) != n for p, n in zip(payloads, lengths, strict=True)):
            raise FormatError("reverse: payload of the wrong length")
        return [bytes(p)[::-1] for p in payloads]


class ReversePlugin:
    @hookimpl
    def vmdelta_register_encoders(self, register) -> None:
        register(ReverseEncoder())


def registry_with(*plugins: object, blocked: frozenset[str] = frozenset()) -> Registry:
    pm = new_plugin_manager(load_entry_points=False, blocked=blocked)
    for plugin in plugins:
        pm.register(plugin, name=type(plugin).__name__)
    return Registry(pm)


def test_builtins_register_through_the_same_hooks() -> None:
    registry = registry_with()
    assert {(i.kind, i.name) for i in registry} == {
        ("codec", "zstd"),
        ("codec", "zstd-base"),
        ("codec", "lzma"),
        ("codec", "none"),
        ("encoder", "raw"),
        ("source", "file"),
    }
    assert all(i.distribution == "vmdelta-core" for i in registry)


def test_an_in_test_plugin_registers_and_unregisters() -> None:
    pm = new_plugin_manager(load_entry_points=False, blocked=frozenset())
    plugin = ReversePlugin()
    pm.register(plugin, name="reverse-plugin")
    assert "reverse" in Registry(pm).names("encoder")
    pm.unregister(plugin)
    assert "reverse" not in Registry(pm).names("encoder")


def test_conformance_check_catches_an_encoder_that_does_not_check_its_payloads() -> None:
    class Careless(ReverseEncoder):
        def decode(self, bases, payloads, lengths) -> list[bytes]:
            return [bytes(p)[::-1] for p in payloads]

    with pytest.raises(AssertionError, match="damaged payload"):
        check_encoder(Careless())


def test_third_party_encoder_gets_a_free_ref_and_round_trips(tmp_path: Path) -> None:
    check_encoder(ReverseEncoder())
    registry = registry_with(ReversePlugin())
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 16 * 4096, dtype=np.uint8)
    modified = base.copy()
    modified[4096:8192] = rng.integers(0, 256, 4096, dtype=np.uint8)
    (tmp_path / "b").write_bytes(base.tobytes())
    (tmp_path / "m").write_bytes(modified.tobytes())
    overlay = tmp_path / "o"
    report = create_overlay(
        CreateConfig(
            output=overlay,
            images=[ImageSpec("disk", tmp_path / "b", tmp_path / "m", encoders=("reverse",), policy="fixed")],
            cache_dir=tmp_path / "c",
        ),
        registry=registry,
    )
    ref = next(c.ref for c in report.metadata.components if c.name == "reverse")
    assert ref == 0xA
    reverse = report.images[0].statistics.encoders["reverse"]
    assert (reverse.units, reverse.bytes) == (1, 4096) and 0 < reverse.stored_bytes <= 4096 + 64
    apply_overlay(
        ApplyConfig(
            overlay=overlay, images=[ApplyImageSpec("disk", tmp_path / "b", tmp_path / "out")], cache_dir=tmp_path / "c"
        ),
        registry=registry,
    )
    assert (tmp_path / "out").read_bytes() == modified.tobytes()
    # without the plugin, apply names what to install and writes nothing
    with pytest.raises(PluginError, match="encoder 'reverse' from"):
        apply_overlay(
            ApplyConfig(overlay=overlay, images=[ApplyImageSpec("disk", tmp_path / "b", tmp_path / "out2")]),
            registry=registry_with(),
        )
    assert not (tmp_path / "out2").exists()


def test_duplicate_names_are_refused() -> None:
    class Again:
        @hookimpl
        def vmdelta_register_encoders(self, register) -> None:
            register(ReverseEncoder())

    with pytest.raises(PluginError, match="registered twice"):
        registry_with(ReversePlugin(), Again())


def test_a_component_missing_methods_is_refused() -> None:
    class Broken:
        @hookimpl
        def vmdelta_register_encoders(self, register) -> None:
            register(object())

    with pytest.raises(PluginError, match="without name, encode, decode"):
        registry_with(Broken())


def test_blocked_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDELTA_DISABLE_PLUGINS", "core-codecs, reverse-plugin")
    assert blocked_plugins() == {"core-codecs", "reverse-plugin"}
    registry = Registry(new_plugin_manager(load_entry_points=False))
    assert registry.names("codec") == []
    assert registry.names("encoder") == ["raw"]
    with pytest.raises(PluginError, match="no codec named 'zstd' is installed"):
        registry.codec("zstd")


def test_detection_falls_back_to_the_plain_file_source(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 100)
    assert registry_with().detect_source(path, "disk") == "file"


# --------------------------------------------------------------------------------------------
# once per process
# --------------------------------------------------------------------------------------------


def test_the_default_registry_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMDELTA_DISABLE_PLUGINS", raising=False)
    first = default_registry()
    assert default_registry() is first
    assert default_registry().pm is first.pm


def test_the_default_registry_follows_the_blocked_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDELTA_DISABLE_PLUGINS", "core-codecs")
    blocked = default_registry()
    assert blocked.names("codec") == [] and default_registry() is blocked
    monkeypatch.setenv("VMDELTA_DISABLE_PLUGINS", " core-codecs ,")  # the same set, written otherwise
    assert default_registry() is blocked
    monkeypatch.delenv("VMDELTA_DISABLE_PLUGINS")
    assert "zstd" in default_registry().names("codec")


def hookspecs_module(name: str) -> ModuleType:
    """A module of hook specs, as a plugin that other plugins extend would have."""
    module = ModuleType(name)

    @hookspec
    def vmdelta_test_extension(register) -> None:  # type: ignore[no-untyped-def]
        """Register extensions."""

    module.vmdelta_test_extension = vmdelta_test_extension  # type: ignore[attr-defined]
    return module


def test_a_plugin_adds_hooks_that_another_implements_in_any_order() -> None:
    specs = hookspecs_module("extension_specs")
    seen: list[str] = []

    class Extended:
        """Adds a hook spec and hands the manager to its component, as the trim filter does."""

        @hookimpl
        def vmdelta_addhooks(self, pluginmanager) -> None:
            pluginmanager.add_hookspecs(specs)

        @hookimpl
        def vmdelta_register_encoders(self, register, pluginmanager) -> None:
            encoder = ReverseEncoder()
            encoder.pm = pluginmanager  # type: ignore[attr-defined]
            register(encoder)

    class Extension:
        @hookimpl
        def vmdelta_test_extension(self, register) -> None:
            register("mine")

    for plugins in ((Extended(), Extension()), (Extension(), Extended())):
        registry = registry_with(*plugins)
        pm = registry.encoder("reverse").pm  # type: ignore[attr-defined]
        assert pm is registry.pm and pm.hook.vmdelta_test_extension.has_spec()
        seen.clear()
        pm.hook.vmdelta_test_extension(register=seen.append)
        assert seen == ["mine"]


def test_register_hooks_may_leave_out_the_plugin_manager() -> None:
    # ReversePlugin's hook takes only `register`; pluggy checks the names against the spec
    assert registry_with(ReversePlugin()).names("encoder") == ["raw", "reverse"]

    class Misnamed:
        @hookimpl
        def vmdelta_register_encoders(self, register, manager) -> None:
            pass

    with pytest.raises(pluggy.PluginValidationError, match="manager"):
        registry_with(Misnamed())
