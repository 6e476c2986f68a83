"""``export --elijah`` / ``import`` with the plugins installed: encoders the package has keep their
records, the others are stored RAW; a memory read by the QEMU source is refused with the way out."""

from __future__ import annotations

import lzma
import struct
import subprocess
import zipfile
from pathlib import Path

import msgpack
import pytest
from samples import sample_pair, write_pair

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay
from vmdelta_core.cli import main

XDELTA, BSDIFF, XOR = 0x2, 0x7, 0x9


def package_refs(package: Path) -> set[int]:
    """The refs of every item in the package, read from the records as the original laid them out."""
    refs = set()
    with zipfile.ZipFile(package) as z:
        meta = msgpack.unpackb(z.read("overlay-meta"), raw=False)
        for entry in meta["overlay_files"]:
            stream = lzma.decompress(z.read(entry["overlay_name"]))
            pos = 0
            while pos < len(stream):
                _, _, info = struct.unpack_from("!QHB", stream, pos)
                ref = info >> 4
                pos += 11
                if ref in (0x1, XDELTA, BSDIFF, XOR):
                    pos += 8 + struct.unpack_from("!Q", stream, pos)[0]
                elif ref in (0x3, 0x4, 0x5):
                    pos += 8
                refs.add(ref)
    return refs


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("disk_encoder", "kept"), [("xdelta3", XDELTA), ("bsdiff", BSDIFF)])
def test_encoders_the_package_lacks_become_raw_and_the_rest_keep_their_records(tmp_path, capsys, disk_encoder, kept):
    memory = write_pair(tmp_path, "memory", *sample_pair(seed=11, units=48))
    base, modified = sample_pair(seed=12, units=40)
    for unit in (9, 10, 21, 22):  # small edits of units with data in the base: what delta encoders are for
        modified[unit * 4096 + 100 : unit * 4096 + 116] ^= 0x5A
    disk = write_pair(tmp_path, "disk", base, modified)
    overlay = tmp_path / "vm.vmdo"
    create_overlay(
        CreateConfig(
            output=overlay,
            images=[
                ImageSpec("memory", *memory, format="file", encoders=("xor", "raw"), policy="first-smaller"),
                # the disk as detected: the raw source
                ImageSpec("disk", *disk, encoders=(disk_encoder, "raw"), policy="first-smaller"),
            ],
        )
    )
    package = tmp_path / "out.zip"
    code, err = run(capsys, "export", overlay, "--elijah", package, "--base-disk", disk[0])
    assert code != 0 and "give --base-memory" in err and len(err.strip().splitlines()) == 1
    assert not package.exists()
    code, err = run(
        capsys, "export", "--json", overlay, "--elijah", package, "--base-disk", disk[0], "--base-memory", memory[0]
    )
    assert code == 0, err
    refs = package_refs(package)
    assert kept in refs and XOR not in refs
    back = tmp_path / "back.vmdo"
    code, err = run(capsys, "import", "-q", package, "--base-memory", memory[0], "--base-disk", disk[0], "-o", back)
    assert code == 0, err
    code, err = run(
        capsys, "apply", "-q", back, "--memory", memory[0], tmp_path / "m.out", "--disk", disk[0], tmp_path / "d.out"
    )
    assert code == 0, err
    assert (tmp_path / "m.out").read_bytes() == memory[1].read_bytes()
    assert (tmp_path / "d.out").read_bytes() == disk[1].read_bytes()


@pytest.mark.slow
def test_a_memory_read_by_the_qemu_source_is_refused_with_the_way_out(realistic, tmp_path, capsys):
    overlay = tmp_path / "vm.vmdo"
    code, err = run(
        capsys,
        "create",
        "-q",
        "-o",
        overlay,
        "--memory",
        realistic / "base.mem",
        realistic / "modified.mem",
        "--disk",
        realistic / "base.img",
        realistic / "modified.img",
        "--encoder",
        "raw",
    )
    assert code == 0, err
    package = tmp_path / "out.zip"
    code, err = run(capsys, "export", overlay, "--elijah", package, "--base-disk", realistic / "base.img")
    assert code == 2
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and "'qemu' source, which keeps an envelope" in lines[0] and "--memory-format file" in lines[0]
    ), err
    assert not package.exists()


def test_a_qcow2_disk_is_refused(tmp_path, capsys):
    """A qcow2's image is the guest's disk, not the file's bytes: the package cannot hold it."""
    memory = write_pair(tmp_path, "memory", *sample_pair(seed=13, units=24))
    disk = write_pair(tmp_path, "disk", *sample_pair(seed=14, units=32))
    qcow2 = []
    for raw in disk:
        converted = raw.with_suffix(".qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, converted], check=True)
        qcow2.append(converted)
    overlay = tmp_path / "vm.vmdo"
    code, err = run(
        capsys, "create", "-q", "-o", overlay, "--memory", *memory, "--disk", *qcow2, "--memory-format", "file"
    )
    assert code == 0, err
    package = tmp_path / "out.zip"
    code, err = run(capsys, "export", overlay, "--elijah", package, "--base-disk", qcow2[0])
    assert code == 2
    assert "'qcow2' source, whose image is not its file byte for byte" in err and len(err.strip().splitlines()) == 1
    assert not package.exists()
