"""Save images built from libvirt 9.0.0's layout around a real QEMU stream: every format, the
header's variants, exactness, and every refused input."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import vmdelta_source_libvirt
from libvirt_helpers import COMPRESS, DOMAIN_XML, compress, header, save_image
from vmdelta_source_libvirt import LibvirtSource
from vmdelta_source_libvirt.envelope import unpack_envelope
from vmdelta_source_qemu import QemuSource

from vmdelta_core.plugin import ConfigError, FormatError, RebuiltImage, SourceImage, StorageError
from vmdelta_core.testing import check_source, default_registry, main

FORMATS = ["raw", "gzip", "bzip2", "xz", "lzop", "zstd"]


def _need(fmt: str) -> None:
    if fmt != "raw" and shutil.which(COMPRESS[fmt][0]) is None:
        pytest.skip(f"{COMPRESS[fmt][0]} is not installed")


def _write(folder: Path, data: bytes, name: str = "vm.sav") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _materialize(image: SourceImage, folder: Path) -> Path:
    raw = folder / "rebuilt.raw"
    raw.write_bytes(image.data.tobytes())
    out = folder / "rebuilt.sav"
    rebuilt = RebuiltImage(
        path=raw,
        size=image.size,
        unit_size=4096,
        envelope=image.envelope,
        layout=image.layout,
        changed=np.zeros(0, np.int64),
        base=image,
        base_path=raw,
    )
    LibvirtSource().materialize(rebuilt, out)
    return out


def test_registered_and_detected_by_magic(tmp_path: Path, stream: bytes) -> None:
    registry = default_registry()
    assert registry.info("source", "libvirt").distribution == "vmdelta-source-libvirt"
    detect = vmdelta_source_libvirt.vmdelta_detect_source
    for magic in (b"LibvirtQemudSave", b"LibvirtQemudPart"):
        assert detect(path=tmp_path, head=magic + bytes(80), kind="memory") == "libvirt"
    assert detect(path=tmp_path, head=b"LibvirtQemudSave", kind="disk") is None
    assert detect(path=tmp_path, head=stream[:64], kind="memory") is None
    assert registry.detect_source(_write(tmp_path, save_image(stream)), "memory") == "libvirt"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_streams_image_and_rebuilds(tmp_path: Path, stream: bytes, fmt: str) -> None:
    """Each program writes the same bytes again; lzop's header (with the time it ran) is kept."""
    _need(fmt)
    path = _write(tmp_path, save_image(stream, fmt))
    bare = _write(tmp_path, stream, "bare.mem")
    with QemuSource().open(bare, kind="memory", options={}) as expected:
        image = check_source(LibvirtSource(), path, "memory")
        try:
            assert np.array_equal(image.data, expected.data)
            assert image.layout["blocks"] == expected.layout["blocks"]
            assert image.exact_artifact
            info = image.layout["libvirt"]
            assert info["compression"] == fmt and info["domain"] == "vmdelta-small"
            assert info["uuid"] == "7d9a3c52-5a5e-4f3e-9d59-0c1f5f5b2a11" and info["was_running"] is True
            assert info["stream_offset"] == 92 + info["data_len"]
            assert (info["compressor"] is None) == (fmt == "raw")
            envelope = unpack_envelope(image.envelope)
            assert envelope.prefix == path.read_bytes()[: info["stream_offset"]]
            assert envelope.stream == expected.envelope
            assert bool(envelope.head) == (fmt == "lzop")
        finally:
            image.close()


def test_lzop_writes_its_time_and_the_images_header_is_kept(tmp_path: Path, stream: bytes) -> None:
    """lzop stores the time it ran: an image made a second earlier differs from a new run only
    there, and is rebuilt with its own header."""
    _need("lzop")
    data = bytearray(save_image(stream, "lzop"))
    start = 92 + int.from_bytes(data[20:24], "little")
    mtime = start + 25  # lzop 1.04: magic 9, versions 6, method and level 2, flags 4, mode 4
    data[mtime : mtime + 4] = (int.from_bytes(data[mtime : mtime + 4], "big") - 86400).to_bytes(4, "big")
    # the header checksum (Adler-32 of the header after the magic) follows the empty name
    checksum = mtime + 9
    data[checksum : checksum + 4] = zlib.adler32(bytes(data[start + 9 : checksum])).to_bytes(4, "big")
    path = _write(tmp_path, bytes(data))
    image = check_source(LibvirtSource(), path, "memory")
    with image:
        assert image.exact_artifact
        assert _materialize(image, tmp_path).read_bytes() == bytes(data)
    assert subprocess.run(["lzop", "-dc"], input=bytes(data[start:]), capture_output=True, check=True).stdout == stream


def test_a_stream_compressed_otherwise_is_rebuilt_as_libvirt_compresses(tmp_path: Path, stream: bytes) -> None:
    """``gzip -9`` is not what libvirt runs: the image is not the same file once rebuilt, and
    says so; the rebuilt file holds the same stream, compressed as libvirt does."""
    prefix = save_image(stream)[: -len(stream)]
    prefix = prefix[:28] + (1).to_bytes(4, "little") + prefix[32:]
    nine = subprocess.run(["gzip", "-9", "-c"], input=stream, capture_output=True, check=True).stdout
    path = _write(tmp_path, prefix + nine)
    with LibvirtSource().open(path, kind="memory", options={}) as image:
        assert not image.exact_artifact
        assert _materialize(image, tmp_path).read_bytes() == prefix + compress("gzip", stream)


@pytest.mark.parametrize(
    "kw",
    [{"order": ">"}, {"version": 1, "cookie_offset": 0}, {"was_running": 0}],
    ids=["big-endian", "version-1", "paused"],
)
def test_header_variants(tmp_path: Path, stream: bytes, kw: dict) -> None:
    cookie = None if kw.get("version") == 1 else "<cookie/>\n"
    path = _write(tmp_path, save_image(stream, cookie=cookie, **kw))
    image = check_source(LibvirtSource(), path, "memory")
    with image:
        info = image.layout["libvirt"]
        assert image.exact_artifact
        assert info["byte_order"] == ("big" if kw.get("order") == ">" else "little")
        assert info["version"] == kw.get("version", 2)
        assert info["was_running"] is bool(kw.get("was_running", 1))
        assert info["cookie_bytes"] == (0 if cookie is None else len(cookie))


def _data(xml: bytes, cookie: bytes = b"") -> bytes:
    return xml + cookie + bytes(1024)


BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    b"<domain><name>&b;</name></domain>\0"
)


def _hostile(stream: bytes) -> list[tuple[str, bytes, str]]:
    xml = DOMAIN_XML.encode() + b"\0"
    good = _data(xml)
    network = _data(b"<network><name>x</name></network>\0")
    gz = compress("gzip", stream)
    inflate = "gzip stream does not decompress"
    return [
        ("short", b"LibvirtQemudSave\x02\0", "shorter than a libvirt save image header"),
        ("magic", b"LibvirtQemudSavX" + header(len(good), 0)[16:] + good + stream, "not a libvirt save image"),
        ("partial", header(len(good), 0, magic=b"LibvirtQemudPart") + good + stream, "incomplete"),
        ("version", header(len(good), 0, version=3) + good + stream, "version 3 at offset 16"),
        ("format", header(len(good), 6) + good + stream, "format 6 at offset 28"),
        ("data-past-end", header(1 << 20, 0) + good, "the file holds"),
        ("data-huge", header(0xFFFFFFFF, 0) + good, "more than 67108864"),
        ("no-data", header(0, 0) + stream, "no domain XML"),
        ("cookie-past-data", header(len(good), 0, cookie_offset=len(good) + 1) + good + stream, "cookie offset"),
        ("xml-unterminated", header(10, 0, cookie_offset=5) + b"<dom>\0\0\0\0\0" + stream, "no terminating NUL"),
        ("xml-not-utf8", header(len(good), 0) + _data(b"<domain>\xff</domain>\0") + stream, "not UTF-8"),
        ("xml-broken", header(len(good), 0) + _data(b"<domain><name>x</domain>\0") + stream, "does not parse"),
        ("xml-entities", header(1200, 0) + BILLION_LAUGHS.ljust(1200, b"\0") + stream, "does not parse"),
        ("xml-not-domain", header(len(good), 0) + network + stream, "not a libvirt domain"),
        ("stream-missing", header(len(good), 0) + good + b"QEVX" + stream[4:], "QEVM"),
        ("stream-cut", header(len(good), 0) + good + stream[:-100], "truncated"),
        ("gzip-damaged", header(len(good), 1) + good + gz[:-50], inflate),
        ("gzip-trailing", header(len(good), 1) + good + gz + b"junk", inflate),
    ]  # fmt: skip


def test_every_refused_input_is_one_line(tmp_path: Path, stream: bytes) -> None:
    for name, data, message in _hostile(stream):
        path = _write(tmp_path, data, f"{name}.sav")
        with pytest.raises(FormatError, match=message) as caught:
            LibvirtSource().open(path, kind="memory", options={}).close()
        assert "\n" not in str(caught.value), name


def test_cli_refuses_a_damaged_image_with_one_line(
    tmp_path: Path, stream: bytes, capsys: pytest.CaptureFixture
) -> None:
    good = _write(tmp_path, save_image(stream), "good.sav")
    bad = _write(tmp_path, header(1 << 30, 0) + bytes(100), "bad.sav")
    out = tmp_path / "x.vmdo"
    assert main(["create", "-o", str(out), "--memory", str(good), str(bad)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmdelta: error:") and "bad.sav" in err[0]
    assert not out.exists()


def test_a_compressed_stream_is_bounded_by_max_ram(tmp_path: Path, stream: bytes) -> None:
    """A zstd image of a few KB claiming 40 MiB: decompression stops at the bound."""
    bomb = save_image(stream[:-64] + bytes(40 << 20), "zstd")
    path = _write(tmp_path, bomb)
    assert path.stat().st_size < 200_000
    with pytest.raises(FormatError, match="decompresses to more than"):
        LibvirtSource().open(path, kind="memory", options={"max_ram": 4 << 20})
    with pytest.raises(ConfigError, match="max_ram"):
        LibvirtSource().open(path, kind="memory", options={"max_ram": "lots"})


def test_a_missing_compressor_names_its_package(tmp_path: Path, stream: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, save_image(stream, "xz"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="Debian package xz-utils"):
        LibvirtSource().open(path, kind="memory", options={})


def test_a_damaged_envelope_is_refused_before_anything_is_written(tmp_path: Path, stream: bytes) -> None:
    with LibvirtSource().open(_write(tmp_path, save_image(stream)), kind="memory", options={}) as image:
        envelope = image.envelope
        length = int.from_bytes(envelope[8:12], "big")
        head_at = 12 + length
        for broken in (
            b"LVSAVE02" + envelope[8:],
            envelope[:12],
            envelope[:8] + (1 << 31).to_bytes(4, "big") + envelope[12:],
            envelope[:12] + b"LibvirtQemudPart" + envelope[28:],
            envelope[:12] + envelope[12:40] + (6).to_bytes(4, "little") + envelope[44:],
            envelope[:head_at] + (5000).to_bytes(4, "big") + envelope[head_at + 4 :],
            envelope[: head_at + 2],
            envelope[: head_at + 4] + b"QEMUENV1" + bytes(3),
        ):
            image.envelope = broken
            with pytest.raises(FormatError):
                _materialize(image, tmp_path)


def test_the_decompressed_stream_goes_to_tmpdir_and_leaves_nothing(tmp_path: Path, stream: bytes) -> None:
    path = _write(tmp_path, save_image(stream, "gzip"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with LibvirtSource().open(path, kind="memory", options={"tmpdir": str(scratch)}) as image:
        assert image.exact_artifact
        assert list(scratch.iterdir()) == []  # unlinked files only
        out = _materialize(image, tmp_path)
        assert out.read_bytes() == path.read_bytes()
    with pytest.raises(StorageError, match="cannot make a temporary file in"):
        LibvirtSource().open(path, kind="memory", options={"tmpdir": str(tmp_path / "missing")})
