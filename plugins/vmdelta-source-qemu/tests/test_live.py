"""The live-migration stream splitter (:mod:`vmdelta_source_qemu.live`): on the real captures, on a
real live migration of a running guest (also fed through a pipe by a slow writer), and on cut,
flipped and refused streams.

The contract a relay relies on: the stream bytes of the tokens, in order, are the input byte for
byte; each page's address is its offset in the image the ``qemu`` source makes of the same
stream, and the last copy of a page is that image's page.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from qemu_stream_builder import COMPRESS, FLUSH, HOOK, PAGE, XBZRLE, StreamBuilder, be64, pattern, simple_stream
from vmdelta_source_qemu import (
    BUFFER_SIZE,
    Page,
    PageRun,
    PassEnd,
    QemuSource,
    Verbatim,
    split_live_runs,
    split_live_stream,
    stream_pieces,
)
from vmdelta_source_qemu.scan import KIND_PAGE
from vmdelta_source_qemu.stream import parse_stream

from vmdelta_core.plugin import FormatError
from vmdelta_core.testing import check_untrusted, fuzz_settings

STREAMS = [
    "base.mem",
    "modified.mem",
    "variants/qemu-10.0-stream/base.mem",
    "variants/qemu-10.0-stream/modified.mem",
    "variants/qemu-7.2-ignore-shared/modified.mem",
    "variants/qemu-10.0-ignore-shared/modified.mem",
]


def split(data: bytes, **options: Any) -> list[Any]:
    return list(split_live_stream(io.BytesIO(data), **options))


def joined(tokens: list[Any]) -> bytes:
    return b"".join(bytes(piece) for piece in stream_pieces(tokens))


def page_records(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image address of every PAGE record of the stream in ``path``, in stream order, and
    whether it is the page's last record, as the ``qemu`` source's parser finds them."""
    parsed = parse_stream(np.fromfile(path, np.uint8))
    try:
        t = parsed.table
        first_pages = np.array([b.first_page for b in parsed.blocks], np.int64)
        pages = t.kind == KIND_PAGE
        return (first_pages[t.block[pages]] + t.page[pages]) * PAGE, t.final[pages]
    finally:
        parsed.image.close()


def check_split(path: Path, options: dict[str, Any] | None = None) -> list[tuple[int, int]]:
    """Split ``path`` both ways: byte for byte, pages where and as the ``qemu`` source has them.
    Returns the number of the pass each page came in and its address."""
    options = options or {}
    data = path.read_bytes()
    with path.open("rb", buffering=0) as f:
        tokens = list(split_live_stream(f))
    assert joined(tokens) == data
    pages = [t for t in tokens if isinstance(t, Page)]
    addresses, final = page_records(path)
    assert [p.address for p in pages] == addresses.tolist()
    with QemuSource().open(path, kind="memory", options=options) as image:
        for page, last in zip(pages, final.tolist(), strict=True):
            if last:
                assert image.data[page.address : page.address + PAGE].tobytes() == page.data
    with path.open("rb", buffering=0) as f:
        runs = list(split_live_runs(f))
    assert joined(runs) == data
    in_runs = [run.page(i) for run in runs if isinstance(run, PageRun) for i in range(len(run))]
    assert in_runs == pages
    passes, numbers = 0, []
    for token in tokens:
        if isinstance(token, PassEnd):
            assert token.number == passes + 1
            passes = token.number
        elif isinstance(token, Page):
            numbers.append((passes + 1, token.address))
    return numbers


@pytest.mark.fixtures
@pytest.mark.parametrize("name", STREAMS)
def test_real_captures_split_exactly(fixture_set: Path, name: str) -> None:
    path = fixture_set / name
    options = {"ram": str(path.with_name("modified-ram.raw"))} if "ignore-shared" in name else {}
    pages = check_split(path, options)
    # a stopped VM's save sends each page once
    assert pages and len({address for _, address in pages}) == len(pages)


@pytest.mark.fixtures
def test_mapped_ram_is_refused(fixture_set: Path) -> None:
    path = fixture_set / "variants/qemu-10.0-mapped-ram/base.mem"
    with path.open("rb") as f, pytest.raises(FormatError, match="turn off the mapped-ram capability"):
        list(split_live_runs(f))


# -- a real live migration ----------------------------------------------------------------------


def _qmp_client() -> Any:
    qmp = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is not installed")
    return qmp.QEMUMonitorProtocol


def _qemu(version: str) -> tuple[list[str], dict[str, str]]:
    """The command that starts QEMU ``version`` and its environment, or a skip: 7.2 is Debian 12's,
    10.0 the one ``tools/fetch-qemu10.sh`` unpacks (``$VMDELTA_QEMU10``)."""
    if version == "7.2":
        if shutil.which("qemu-system-x86_64") is None:
            pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
        return ["qemu-system-x86_64"], dict(os.environ)
    root = Path(os.environ.get("VMDELTA_QEMU10", "/tmp/vmdelta-qemu10"))
    if not (root / "usr/bin/qemu-system-x86_64").is_file():
        pytest.skip("QEMU 10 not unpacked (plugins/vmdelta-source-qemu/tools/fetch-qemu10.sh)")
    firmware = ["-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios")]
    modules = str(root / "usr/lib/x86_64-linux-gnu/qemu")
    return [str(root / "usr/bin/qemu-system-x86_64"), *firmware], {**os.environ, "QEMU_MODULE_DIR": modules}


@pytest.fixture(scope="module", params=["7.2", "10.0"])
def live_capture(request: pytest.FixtureRequest, fixture_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A running guest (the fixture kernel booting, TCG, 128 MiB) migrated while it runs to
    ``exec:cat > FILE`` at 8 MiB/s by QEMU 7.2 and 10.0: QEMU makes pass after pass over the pages
    the guest dirties. The downtime limit is kept low until QEMU has synchronized its dirty bitmap
    three times, then raised so that the migration ends."""
    qemu, env = _qemu(request.param)
    monitor = _qmp_client()
    folder = tmp_path_factory.mktemp("live")
    sock, out, log = folder / "qmp.sock", folder / "live.mem", folder / "qemu.log"
    with log.open("wb") as stderr:
        vm = subprocess.Popen(
            [
                *qemu,
                *("-accel", "tcg", "-machine", "pc", "-cpu", "qemu64", "-smp", "1", "-m", "128M"),
                *("-nographic", "-monitor", "none", "-parallel", "none", "-nic", "none", "-no-reboot"),
                *("-kernel", str(fixture_set / "boot/vmlinuz"), "-initrd", str(fixture_set / "boot/initramfs.cpio.gz")),
                *("-append", "console=ttyS0 panic=-1 quiet fixture_mem=128"),
                *("-drive", f"file={fixture_set / 'base.img'},format=raw,if=virtio,snapshot=on"),
                *("-serial", f"file:{folder / 'serial.log'}", "-serial", "null"),
                *("-qmp", f"unix:{sock},server=on,wait=off"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    qmp = monitor(str(sock))
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if vm.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"QEMU did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        qmp.connect()
        time.sleep(1.5)  # the guest is booting: it dirties pages while it migrates
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20, "downtime-limit": 50})
        qmp.cmd("migrate", uri=f"exec:cat > {out}")
        status: dict[str, Any] = {}
        raised = False
        while time.monotonic() < deadline + 60:
            status = qmp.cmd("query-migrate")
            if status["status"] in ("completed", "failed", "cancelled"):
                break
            if not raised and status.get("ram", {}).get("dirty-sync-count", 0) >= 3:
                qmp.cmd("migrate-set-parameters", **{"downtime-limit": 2000})
                raised = True
            time.sleep(0.05)
        assert status.get("status") == "completed", json.dumps(status)
    finally:
        qmp.close()
        vm.terminate()
        vm.wait()
    return out


@pytest.mark.fixtures
def test_live_migration_splits_exactly(live_capture: Path) -> None:
    pages = check_split(live_capture)
    assert len({number for number, _ in pages}) >= 2
    by_address: dict[int, set[int]] = {}
    for number, address in pages:
        by_address.setdefault(address, set()).add(number)
    # pages the booting guest dirtied were sent again in later passes (thousands, as it boots)
    assert any(len(numbers) > 1 for numbers in by_address.values())


class _SlowPipe:
    """The read end of a pipe a thread fills in uneven writes, pausing now and then; counts the
    bytes read. It has no ``seek``: the splitter cannot go back."""

    def __init__(self, data: bytes) -> None:
        read_fd, write_fd = os.pipe()
        self.raw = os.fdopen(read_fd, "rb", buffering=0)
        self.read = 0
        self.writer = threading.Thread(target=self._write, args=(data, write_fd), daemon=True)
        self.writer.start()

    @staticmethod
    def _write(data: bytes, fd: int) -> None:
        sizes = [1, 7, 4104, 65536, 13, 200_000, 4096, 9]
        with os.fdopen(fd, "wb", buffering=0) as out:
            at, turn = 0, 0
            while at < len(data):
                size = sizes[turn % len(sizes)]
                out.write(data[at : at + size])
                at, turn = at + size, turn + 1
                if turn % 64 == 0:
                    time.sleep(0.001)

    def readinto(self, buffer: memoryview) -> int:
        got = self.raw.readinto(buffer)
        self.read += got or 0
        return got  # type: ignore[no-any-return]


@pytest.mark.fixtures
def test_live_migration_through_a_pipe(live_capture: Path) -> None:
    """Fed as QEMU feeds a relay: what was read and not yet handed on stays within two buffers."""
    data = live_capture.read_bytes()
    pipe = _SlowPipe(data)
    handed, ahead = 0, 0
    out = bytearray()
    for piece in stream_pieces(split_live_runs(pipe)):  # type: ignore[arg-type]
        out += piece
        handed += len(piece)
        ahead = max(ahead, pipe.read - handed)
    pipe.writer.join()
    pipe.raw.close()
    assert out == data
    assert 0 < ahead <= 2 * BUFFER_SIZE


# -- refused and hostile streams ----------------------------------------------------------------


def _stream(edit: str) -> bytes:
    """A small stream with one thing a relay cannot carry."""
    capabilities = ["mapped-ram"] if edit == "mapped-ram" else None
    b = StreamBuilder([("pc.ram", 4 * PAGE), ("vga.vram", PAGE)], capabilities=capabilities)
    if edit == "return-path":
        b.command(1)
    if edit == "postcopy":
        b.command(3, bytes(16))
    b.start(idstr="block" if edit == "block" else "ram")
    b.eos_footer()
    b.part()
    b.page("pc.ram", 0, pattern(0))
    flags = {"xbzrle": XBZRLE, "compress": COMPRESS, "rdma": HOOK, "multifd": FLUSH}
    if edit in flags:
        b.raw(be64(flags[edit]))
    if edit == "beyond":
        b.page("vga.vram", 1, pattern(1))
    if edit == "unknown block":
        b.page("rom", 0, pattern(1))
    b.eos_footer()
    if edit == "device first":
        b.device(3, "timer", bytes(8))
    b.part(end=True)
    b.eos_footer()
    b.devices()
    return b.finish()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("mapped-ram", "turn off the mapped-ram capability"),
        ("return-path", "turn off the return-path and postcopy-ram capabilities"),
        ("postcopy", "MIG_CMD_POSTCOPY_ADVISE.*turn off the postcopy-ram capability"),
        ("block", "iterative section 'block' at offset 26: only RAM may be saved iteratively"),
        ("xbzrle", "turn off the xbzrle capability"),
        ("compress", "turn off the compress capability"),
        ("rdma", "RDMA hook"),
        ("multifd", "turn off the multifd capability"),
        ("beyond", "lies beyond block 'vga.vram'"),
        ("unknown block", "block 'rom', which is not in the block table"),
        ("device first", "device section at offset .* before the RAM section ended"),
    ],
)
def test_what_a_relay_cannot_carry_is_refused(edit: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        split(_stream(edit))


def test_a_block_table_beyond_max_ram_is_refused() -> None:
    data = simple_stream()
    with pytest.raises(FormatError, match=r"claims 40960 bytes of RAM, more than max_ram \(32768\)"):
        split(data, max_ram=8 * PAGE)
    assert joined(split(data, max_ram=10 * PAGE)) == data


def test_claims_cost_what_the_stream_holds() -> None:
    """A block table claiming 1 TiB with pages at its far end is split in a few MiB; device state
    past ``max_device_state`` is refused, not held."""
    b = StreamBuilder([("pc.ram", (1 << 40) - PAGE), ("vga.vram", PAGE)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    b.page("pc.ram", (1 << 28) - 2, pattern(1))
    b.page("vga.vram", 0, pattern(2))
    b.eos_footer()
    b.devices()
    data = b.finish()
    tokens = check_untrusted("qemu live stream", lambda: split(data), memory=8 << 20)
    assert [t.address for t in tokens if isinstance(t, Page)] == [(1 << 40) - 2 * PAGE, (1 << 40) - PAGE]
    with pytest.raises(FormatError, match="more than 64 bytes of device state after the RAM section"):
        split(data, max_device_state=64)


def test_passes_and_last_pages() -> None:
    """The synthetic stream's sections: setup (no pass), two PART and the END; page 1 of pc.ram
    is sent again in the END section, vga.vram follows pc.ram in the image."""
    tokens = split(simple_stream())
    assert [t.number for t in tokens if isinstance(t, PassEnd)] == [1, 2, 3]
    pages = [(t.address // PAGE, t.data) for t in tokens if isinstance(t, Page)]
    assert pages == [
        (0, pattern(0)),
        (1, pattern(1)),
        (4, pattern(4)),
        (6, pattern(6)),
        (9, pattern(9)),
        (1, pattern(11)),
    ]
    assert all(isinstance(t, Verbatim) for t in tokens if not isinstance(t, Page | PassEnd))


def test_the_end_is_held_until_checked() -> None:
    """A stream cut in its VM description yields everything before the last piece read, then
    refuses: a consumer that forwards pieces never completes it."""
    data = simple_stream()
    cut = data[:-10]
    received = bytearray()
    with pytest.raises(FormatError, match="truncated"):
        for piece in stream_pieces(split_live_stream(io.BytesIO(cut))):
            received += piece
    assert len(received) < len(cut)


@pytest.fixture(scope="module")
def small_real(fixture_set: Path) -> bytes:
    """A real stream of a few hundred KiB: QEMU 7.2 with x-ignore-shared (block table, the pages of
    VGA memory and ROMs, device state, VM description)."""
    return (fixture_set / "variants/qemu-7.2-ignore-shared/modified.mem").read_bytes()


@pytest.mark.fixtures
def test_every_cut_is_refused(small_real: bytes) -> None:
    """Every cut of the first 1536 bytes (header, configuration, block table, first records), of
    the bytes around the EOF byte and of the last 64, and one cut in 4999 in between."""
    assert joined(split(small_real)) == small_real
    size, eof = len(small_real), small_real.rindex(b"\x00\x06")
    cuts = {*range(1536), *range(1536, size, 4999), *range(eof - 48, eof + 48), *range(size - 64, size)}
    for cut in sorted(cuts):
        with pytest.raises(FormatError):
            split(small_real[:cut])


flips = st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(0, 7)), min_size=1, max_size=4)


@pytest.mark.fixtures
@fuzz_settings(80)
@given(region=st.sampled_from([(0, 4096), (4096, 1 << 32), (-4096, 0)]), flips=flips)
def test_fuzz_bit_flips_are_refused_or_carried(small_real: bytes, region: tuple[int, int], flips: list) -> None:
    """Flipped bits in the head, anywhere, or the end: a clean refusal, or a split that still
    gives the flipped stream back, within the fuzz contract's time and 64 MiB."""
    size = len(small_real)
    start, stop = region[0] % size, min(size, region[1]) if region[1] else size
    data = bytearray(small_real)
    for at, bit in flips:
        data[start + at % (stop - start)] ^= 1 << bit
    flipped = bytes(data)
    result = check_untrusted("qemu live stream", lambda: split(flipped), memory=64 << 20)
    if not isinstance(result, FormatError):
        assert joined(result) == flipped


@fuzz_settings(150)
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(0, 255)), max_size=6), cut=st.integers(0, 1 << 32))
def test_fuzz_synthetic_damage_is_refused_or_carried(edits: list, cut: int) -> None:
    data = bytearray(simple_stream())
    for at, value in edits:
        data[at % len(data)] = value
    damaged = bytes(data[: cut % (len(data) + 2)])
    result = check_untrusted("qemu live stream", lambda: split(damaged), memory=64 << 20)
    if not isinstance(result, FormatError):
        assert joined(result) == damaged


def _tokens_of(data: bytes) -> Iterator[Any]:
    return split_live_runs(io.BytesIO(data))


def test_page_runs_hold_their_headers() -> None:
    """Consecutive PAGE records of a block are one run: its pages in order, the 8-byte header of
    each later record between them."""
    b = StreamBuilder([("pc.ram", 64 * PAGE)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    for page in (3, 4, 9, 40):
        b.page("pc.ram", page, pattern(page))
    b.zero("pc.ram", 41)
    b.page("pc.ram", 42, pattern(42))
    b.eos_footer()
    b.devices()
    data = b.finish()
    runs = [t for t in _tokens_of(data) if isinstance(t, PageRun)]
    assert [run.addresses.tolist() for run in runs] == [[3 * PAGE, 4 * PAGE, 9 * PAGE, 40 * PAGE], [42 * PAGE]]
    assert runs[0].headers == b"".join(be64(page * PAGE | 0x28) for page in (4, 9, 40))
    assert Counter(type(t).__name__ for t in _tokens_of(data))["PassEnd"] == 1
    assert joined(list(_tokens_of(data))) == data
