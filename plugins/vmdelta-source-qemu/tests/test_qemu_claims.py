"""A block table's claim costs nothing until pages back it: memory follows the pages a snapshot
holds, and a claim past ``max_ram`` is refused in one line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qemu_helpers import rebuild
from qemu_stream_builder import PAGE, StreamBuilder, pattern, simple_stream, write_mapped_ram
from vmdelta_source_qemu import QemuSource
from vmdelta_source_qemu.stream import DEFAULT_MAX_RAM

from vmdelta_core.plugin import ConfigError, FormatError, SourceImage, StorageError
from vmdelta_core.testing import check_untrusted

GIB = 1 << 30
CLAIM = 128 * GIB
#: what opening a claim of 128 GiB may allocate (before: 450 MiB, arrays of one entry per page)
BOUND = 16 << 20


def held(claim: int) -> list[int]:
    """The 64 pages of the main block a claiming snapshot holds, spread over the claim."""
    return [i * (claim // PAGE // 64) + i for i in range(64)]


def claiming_stream(claim: int) -> bytes:
    """A stream whose main block claims ``claim`` bytes and which holds 64 pages of it."""
    b = StreamBuilder([("pc.ram", claim), ("vga.vram", 16 << 20)])
    b.start()
    b.eos_footer()
    b.part(end=True)
    for i, page in enumerate(held(claim)):
        b.page("pc.ram", page, pattern(i))
    b.zero("pc.ram", 5)
    b.page("vga.vram", 3, pattern(99))
    b.eos_footer()
    b.devices()
    return b.finish()


def sparse_files_work(folder: Path) -> bool:
    probe = folder / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 30)
    sparse = os.stat(probe).st_blocks * 512 < 1 << 20
    probe.unlink()
    return sparse


def check_image(image: SourceImage, claim: int) -> None:
    """The whole claim is there, zero where no page was sent, the pages where they were."""
    assert image.size == claim + (16 << 20)
    assert image.size - int(image.holes[:, 1].sum()) == 65 * PAGE
    for i in (0, 7, 63):
        at = held(claim)[i] * PAGE
        assert bytes(image.data[at : at + PAGE]) == pattern(i)
    assert bytes(image.data[claim + 3 * PAGE : claim + 4 * PAGE]) == pattern(99)


def open_bounded(path: Path, **options: object) -> SourceImage:
    opened = check_untrusted(
        "qemu stream", lambda: QemuSource().open(path, kind="memory", options=options), memory=BOUND
    )
    assert isinstance(opened, SourceImage), opened
    return opened


def test_a_stream_claiming_128_gib_costs_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "claim.mem"
    path.write_bytes(claiming_stream(CLAIM))
    with open_bounded(path) as image:
        check_image(image, CLAIM)


def test_a_mapped_ram_file_claiming_128_gib_costs_what_it_holds(tmp_path: Path) -> None:
    if not sparse_files_work(tmp_path):
        pytest.skip("the temporary folder's file system has no sparse files")
    path = tmp_path / "claim.mem"
    pages = {("pc.ram", page): pattern(i) for i, page in enumerate(held(CLAIM))} | {("vga.vram", 3): pattern(99)}
    with open(path, "wb") as f:
        write_mapped_ram(f, [("pc.ram", CLAIM), ("vga.vram", 16 << 20)], pages)
    with open_bounded(path) as image:
        assert image.layout["format"] == "mapped-ram" and image.exact_artifact
        check_image(image, CLAIM)


_PEAK = """
import json, resource, sys
from pathlib import Path
from vmdelta_source_qemu import QemuSource
with QemuSource().open(Path(sys.argv[1]), kind="memory", options={}) as image:
    size = image.size
print(json.dumps({"size": size, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def peak_of_open(path: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_peak_rss_of_a_claim_is_that_of_a_small_stream(tmp_path: Path) -> None:
    """The process's own peak (``ru_maxrss``, maps included): a 128 GiB claim costs no more than a
    64 MiB one, give or take 16 MiB (it was 420 MiB more)."""
    small, large = tmp_path / "small.mem", tmp_path / "large.mem"
    small.write_bytes(claiming_stream(64 << 20))
    large.write_bytes(claiming_stream(CLAIM))
    base, claim = peak_of_open(small), peak_of_open(large)
    assert claim["size"] == CLAIM + (16 << 20)
    assert claim["peak"] - base["peak"] < BOUND, (base, claim)


def test_a_claim_past_max_ram_is_refused_before_anything_is_made_for_it(tmp_path: Path) -> None:
    path = tmp_path / "claim.mem"
    path.write_bytes(claiming_stream(2 << 40))
    at = claiming_stream(2 << 40).index(b"ram") + 3 + 8
    message = (
        f"RAM block table at offset {at} claims {(2 << 40) + (16 << 20)} bytes of RAM, more than max_ram "
        f"({DEFAULT_MAX_RAM}); if the VM has that much, raise the qemu source's max_ram option"
    )
    with pytest.raises(FormatError) as refused:
        QemuSource().open(path, kind="memory", options={})
    assert str(refused.value) == message
    with QemuSource().open(path, kind="memory", options={"max_ram": 3 << 40}) as image:
        assert image.size == (2 << 40) + (16 << 20)


@pytest.mark.parametrize(("value", "fits"), [(10 * PAGE, True), (str(10 * PAGE), True), (10 * PAGE - 1, False)])
def test_max_ram_is_the_limit(tmp_path: Path, value: object, fits: bool) -> None:
    path = tmp_path / "s.mem"
    path.write_bytes(simple_stream())  # 10 pages
    if fits:
        QemuSource().open(path, kind="memory", options={"max_ram": value}).close()
    else:
        with pytest.raises(FormatError, match=rf"claims 40960 bytes of RAM, more than max_ram \({value}\)"):
            QemuSource().open(path, kind="memory", options={"max_ram": value})


@pytest.mark.parametrize("value", ["1T", "", 0, -4096, 1.5, True, None, [1]])
def test_a_max_ram_that_is_not_a_number_of_bytes(tmp_path: Path, value: object) -> None:
    path = tmp_path / "s.mem"
    path.write_bytes(simple_stream())
    with pytest.raises(ConfigError, match=r"^max_ram .* is not a positive whole number of bytes$"):
        QemuSource().open(path, kind="memory", options={"max_ram": value})


def test_an_image_file_the_file_system_cannot_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def too_big(fd: int, size: int) -> None:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    path = tmp_path / "s.mem"
    path.write_bytes(simple_stream())
    monkeypatch.setattr(os, "ftruncate", too_big)
    message = rf"cannot make a 40960-byte sparse image file in {tmp_path}: File too large"
    with pytest.raises(StorageError, match=message):
        QemuSource().open(path, kind="memory", options={"tmpdir": str(tmp_path)})


def test_resent_pages_that_end_zero_are_zero(tmp_path: Path) -> None:
    """Nothing is kept per page while the stream is read: a page written and later sent again as
    zero is cleared once the last record of every page is known."""
    b = StreamBuilder([("pc.ram", 4 * PAGE)])
    b.start()
    b.eos_footer()
    b.part()
    for page in range(4):
        b.page("pc.ram", page, pattern(page))
    b.eos_footer()
    b.part(end=True)
    b.zero("pc.ram", 0, force_name=True)
    b.page("pc.ram", 1, bytes(PAGE))
    b.zero("pc.ram", 2, fill=9)
    b.zero("pc.ram", 2)
    b.eos_footer()
    b.devices()
    path = tmp_path / "s.mem"
    path.write_bytes(b.finish())
    with QemuSource().open(path, kind="memory", options={}) as image:
        assert not image.data[: 3 * PAGE].any()
        assert bytes(image.data[3 * PAGE :]) == pattern(3)
        assert image.holes.tolist() == [[0, PAGE], [2 * PAGE, PAGE]]
        assert rebuild(image, tmp_path).read_bytes() == path.read_bytes()
