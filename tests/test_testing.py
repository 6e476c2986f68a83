"""The conformance checks plugin authors call hold for the builtins."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmdelta_core.builtin.codecs import LzmaCodec, NoneCodec, ZstdCodec
from vmdelta_core.builtin.file import FileSource
from vmdelta_core.builtin.raw import RawEncoder
from vmdelta_core.errors import FormatError
from vmdelta_core.hookspecs import hookimpl
from vmdelta_core.testing import check_encoder, check_source, default_registry, registry_with


def test_raw_encoder_conforms() -> None:
    assert check_encoder(RawEncoder()) == {"accepted": 8, "declined": 0}


def test_file_source_conforms(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3 * 4096 + 17, dtype=np.uint8).tobytes())
    check_source(FileSource(), path, "disk").close()


def test_codecs_round_trip_and_refuse_lies() -> None:
    data = b"frame " * 10000
    for codec in (ZstdCodec(), LzmaCodec(), NoneCodec()):
        stored = codec.compress(data, None)
        assert codec.decompress(stored, len(data)) == data
        for wrong in (len(data) - 1, len(data) + 1):
            try:
                codec.decompress(stored, wrong)
            except FormatError:
                continue
            raise AssertionError(f"{codec.name} accepted a wrong size")


def test_registry_with_holds_the_named_plugins_apart_from_the_process_registry() -> None:
    class Plugin:
        @hookimpl
        def vmdelta_register_encoders(self, register) -> None:
            register(Reversed())

    class Reversed(RawEncoder):
        name = "reversed"

    registry = registry_with(Plugin())
    assert registry.info("encoder", "reversed").plugin == "Plugin"
    assert registry.names("codec") == ["lzma", "none", "zstd", "zstd-base"]
    assert "reversed" not in default_registry().names("encoder")
    assert registry_with(blocked=frozenset({"core-codecs"})).names("codec") == []
