"""The public API for streams inside other files (``vmdelta_source_qemu.embedded``): a stream
after a container's header reads as the bare stream does, and is written back after it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from qemu_stream_builder import ignore_shared_stream, mapped_ram_stream, pattern, simple_stream
from vmdelta_source_qemu import QemuSource, is_stream, open_stream, ram_limit, write_stream

from vmdelta_core.plugin import ConfigError, FormatError

# offsets a header may end at: aligned, odd, past a map granule, a libvirt save image's
STARTS = [1, 92, 4096, 5000, 67127]


def _wrapped(folder: Path, stream: bytes, start: int) -> Path:
    path = folder / f"wrapped-{start}.bin"
    path.write_bytes(bytes(range(256)) * (start // 256) + bytes(range(start % 256)) + stream)
    return path


def _rewrite(folder: Path, path: Path, start: int, image: np.ndarray, envelope: bytes) -> bytes:
    """Write the header back, then the stream through write_stream, over a longer old file."""
    raw = folder / "rebuilt.raw"
    raw.write_bytes(image.tobytes())
    out = folder / "out.bin"
    out.write_bytes(b"\xee" * (path.stat().st_size + 10000))
    with open(out, "r+b") as f:
        f.write(path.read_bytes()[:start])
        write_stream(envelope, raw, image.shape[0], f)
    return out.read_bytes()


@pytest.mark.parametrize("start", STARTS)
def test_stream_after_a_header_reads_and_writes_as_the_bare_one(tmp_path: Path, start: int) -> None:
    stream = simple_stream()
    bare_path = tmp_path / "bare.mem"
    bare_path.write_bytes(stream)
    path = _wrapped(tmp_path, stream, start)
    with QemuSource().open(bare_path, kind="memory", options={}) as bare, open_stream(path, start=start) as wrapped:
        assert np.array_equal(wrapped.data, bare.data)
        assert wrapped.envelope == bare.envelope
        assert wrapped.layout == bare.layout
        assert np.array_equal(wrapped.holes, bare.holes)
        assert wrapped.exact_artifact
        assert _rewrite(tmp_path, path, start, wrapped.data, wrapped.envelope) == path.read_bytes()


def test_a_cut_or_padded_wrapped_stream_is_refused_at_its_stream_offset(tmp_path: Path) -> None:
    stream = simple_stream()
    cut = _wrapped(tmp_path, stream[:-10], 92)
    with pytest.raises(FormatError, match=r"truncated|description"):
        open_stream(cut, start=92)
    padded = tmp_path / "padded.bin"
    padded.write_bytes(_wrapped(tmp_path, stream, 92).read_bytes() + bytes(4096))
    with pytest.raises(FormatError, match="zero bytes after the end of the stream"):
        open_stream(padded, start=92)
    with pytest.raises(FormatError, match="QEVM"):
        open_stream(_wrapped(tmp_path, stream, 92), start=91)
    with pytest.raises(FormatError, match="QEVM"):
        open_stream(_wrapped(tmp_path, stream, 92), start=10**6)


def test_mapped_ram_must_start_its_file(tmp_path: Path) -> None:
    stream = mapped_ram_stream([("pc.ram", 4 * 4096)], {("pc.ram", 1): pattern(1)})
    with pytest.raises(FormatError, match="mapped-ram file starts its file"):
        open_stream(_wrapped(tmp_path, stream, 4096), start=4096)


def test_an_ignore_shared_stream_cannot_be_written_inside_another_file(tmp_path: Path) -> None:
    stream, ram = ignore_shared_stream()
    path = _wrapped(tmp_path, stream, 100)
    ram_path = tmp_path / "ram.raw"
    ram_path.write_bytes(ram)
    with (
        open_stream(path, start=100, options={"ram": str(ram_path)}) as image,
        pytest.raises(ConfigError, match="x-ignore-shared"),
    ):
        _rewrite(tmp_path, path, 100, image.data, image.envelope)


def test_is_stream() -> None:
    assert is_stream(simple_stream()[:16])
    assert not is_stream(b"LibvirtQemudSave")
    assert not is_stream(b"QEV")


@pytest.mark.fixtures
@pytest.mark.parametrize("tag", ["base", "modified"])
def test_real_capture_after_an_unaligned_header(fixture_set: Path, tmp_path: Path, tag: str) -> None:
    """The scan releases the stream's pages through a map that starts before the stream: the
    real captures read and rebuild through it as through the bare file."""
    stream = (fixture_set / f"{tag}.mem").read_bytes()
    path = _wrapped(tmp_path, stream, 67127)
    with (
        QemuSource().open(fixture_set / f"{tag}.mem", kind="memory", options={}) as bare,
        open_stream(path, start=67127) as wrapped,
    ):
        assert wrapped.envelope == bare.envelope
        assert hashlib.sha256(wrapped.data).digest() == hashlib.sha256(bare.data).digest()
        out = _rewrite(tmp_path, path, 67127, wrapped.data, wrapped.envelope)
    assert hashlib.sha256(out).digest() == hashlib.sha256(path.read_bytes()).digest()


def test_ram_limit_reads_max_ram_as_the_qemu_source_does() -> None:
    assert ram_limit({}) == 1 << 40
    assert ram_limit({"max_ram": "4096"}) == 4096
    for bad in ("1T", 0, 1.5, True):
        with pytest.raises(ConfigError, match="max_ram"):
            ram_limit({"max_ram": bad})
