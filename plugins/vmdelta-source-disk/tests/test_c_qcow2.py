"""The construct schemas: round trips on QEMU-made headers, and the numpy masks agree with them."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from disk_helpers import qemu_img
from hypothesis import given
from hypothesis import strategies as st
from vmdelta_source_disk import c_qcow2 as c


@pytest.mark.parametrize("options", ["compat=0.10", "compat=1.1", "compression_type=zstd"])
def test_header_and_extensions_round_trip(tmp_path: Path, need_qemu_img: None, options: str) -> None:
    raw = tmp_path / "b.img"
    raw.write_bytes(bytes(1 << 20))
    path = tmp_path / "h.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, "-b", "b.img", "-F", "raw", path, "2M")
    data = path.read_bytes()
    header = c.Qcow2Header.parse(data)
    length = 72 if header.version == 2 else header.v3.header_length
    assert c.Qcow2Header.build(header) == data[:length]
    extensions = c.HeaderExtensions.parse(data[length:])
    built = c.HeaderExtensions.build(extensions)
    assert built == data[length : length + len(built)]
    assert extensions[-1].type == c.EXT_END
    assert any(e.type == c.EXT_BACKING_FORMAT and e.data == b"raw" for e in extensions)
    name = data[header.backing_file_offset : header.backing_file_offset + header.backing_file_size]
    assert name == b"b.img"
    if "zstd" in options:
        assert header.v3.compression_type == 1


@given(offset=st.integers(0, (1 << 47) - 1), copied=st.booleans(), zero=st.booleans())
def test_standard_l2_entry_masks(offset: int, copied: bool, zero: bool) -> None:
    value = (offset << 9) | (c.L2_COPIED if copied else 0) | (c.L2_ZERO if zero else 0)
    entry = c.L2StandardEntry.parse(struct.pack(">Q", value))
    assert entry.host_offset_sectors << 9 == value & c.L2_OFFSET_MASK
    assert entry.copied == bool(value & c.L2_COPIED) and entry.zero == bool(value & c.L2_ZERO)
    assert not entry.compressed
    assert c.L2StandardEntry.build(entry) == struct.pack(">Q", value)
    l1 = c.L1Entry.parse(struct.pack(">Q", (offset << 9) | (c.L2_COPIED if copied else 0)))
    assert l1.l2_offset_clusters << 9 == (offset << 9) & c.L1_OFFSET_MASK


@given(bits=st.integers(9, 21), data=st.data())
def test_compressed_descriptor_masks(bits: int, data: st.DataObject) -> None:
    x, mask = c.compressed_fields(bits)
    host = data.draw(st.integers(0, (1 << x) - 1))
    sectors = data.draw(st.integers(0, mask))
    value = c.L2_COMPRESSED | (sectors << x) | host
    entry = c.compressed_descriptor(bits).parse(struct.pack(">Q", value))
    assert entry.compressed and not entry.copied
    assert (entry.host_offset, entry.additional_sectors) == (host, sectors)
    array = np.array([value], dtype=np.uint64)
    assert int(array[0] & np.uint64((1 << x) - 1)) == host
    assert int((array[0] >> np.uint64(x)) & np.uint64(mask)) == sectors


def test_tables_decode_to_native_arrays() -> None:
    values = np.array([0, 1, 1 << 63, 0x00FFFFFFFFFFFE00], dtype=np.uint64)
    raw = c.Table(4).build(values)
    assert raw == b"".join(struct.pack(">Q", int(v)) for v in values)
    back = c.Table(4).parse(raw)
    assert back.dtype == np.dtype("=u8") and np.array_equal(back, values)
    assert c.Table(3, ">u2").build(np.array([1, 2, 3])) == b"\0\1\0\2\0\3"
