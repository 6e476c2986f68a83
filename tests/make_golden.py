"""Writes the golden files in ``schemas/golden/`` (run it after a deliberate format change).

    python tests/make_golden.py          # every file
    python tests/make_golden.py stream   # only overlay-zstd-stream.vmds, from overlay-zstd.vmdo

Everything is derived from fixed seeds, so the files are reproducible. The stream form is made by
converting the file form, so it holds the same frames byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from samples import sample_pair  # noqa: E402

from vmdelta_core.api import CreateConfig, ImageSpec, create_overlay  # noqa: E402
from vmdelta_core.overlay.container import OverlayReader  # noqa: E402
from vmdelta_core.overlay.convert import convert_overlay  # noqa: E402
from vmdelta_core.overlay.items import pack_items  # noqa: E402
from vmdelta_core.overlay.schema import ItemType, Ref  # noqa: E402
from vmdelta_core.plugins import new_plugin_manager  # noqa: E402
from vmdelta_core.registry import Registry  # noqa: E402

GOLDEN = HERE.parent / "schemas" / "golden"


def golden_items() -> bytes:
    """One record of every ref with every image type."""
    offsets, lengths, refs, types, values, payloads, seqs = [], [], [], [], [], [], []
    for ref in Ref:
        for typ in ItemType:
            offsets.append(len(offsets) * 4096)
            lengths.append(4096)
            refs.append(int(ref))
            types.append(int(typ))
            values.append(0x1000 * (1 + len(values)) if ref in (Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM) else 0)
            if ref == Ref.SELF_HASH:
                payloads.append(bytes(range(32)))
            elif ref in (Ref.SELF, Ref.BASE_DISK, Ref.BASE_MEM, Ref.ZEROS):
                payloads.append(None)
            else:
                payloads.append(f"payload of {ref.name}".encode())
            seqs.append(7 if typ in (ItemType.MEMORY_LIVE, ItemType.DISK_LIVE) else -1)
    return pack_items(offsets, lengths, refs, types, values, payloads, seqs)


def golden_inputs(folder: Path) -> list[ImageSpec]:
    """A memory pair and a disk pair of 24 units each (the disk grows by 1000 bytes)."""
    specs = []
    for kind, seed, grow in (("memory", 1, 0), ("disk", 2, 1000)):  # units 0-20 are edited
        base, modified = sample_pair(seed=seed, units=24, grow=grow)
        b, m = folder / f"{kind}.base", folder / f"{kind}.modified"
        b.write_bytes(base.tobytes())
        m.write_bytes(modified.tobytes())
        specs.append(ImageSpec(kind, b, m, format="file", encoders=("raw",), policy="fixed"))
    return specs


def golden_overlay(folder: Path, output: Path, codec: str) -> None:
    # the core alone, whatever else is installed, so the bytes do not depend on the machine
    registry = Registry(new_plugin_manager(load_entry_points=False, blocked=frozenset()))
    create_overlay(
        CreateConfig(
            output=output,
            images=golden_inputs(folder),
            codec=codec,
            level=3 if codec != "none" else None,
            frame_size=4 << 20,  # the files were written with the default of their time: kept as they are
            threads=1,
            cache_dir=folder / "cache",
        ),
        registry=registry,
    )


def golden_stream(source: Path, output: Path) -> None:
    """The stream form of the overlay at ``source``."""
    with OverlayReader(source) as reader, open(output, "wb") as f:
        convert_overlay(reader, f, stream=True)


if __name__ == "__main__":
    import tempfile

    GOLDEN.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] != ["stream"]:
        (GOLDEN / "items.bin").write_bytes(golden_items())
        for codec in ("none", "zstd", "zstd-base"):
            with tempfile.TemporaryDirectory() as tmp:
                golden_overlay(Path(tmp), GOLDEN / f"overlay-{codec}.vmdo", codec)
    golden_stream(GOLDEN / "overlay-zstd.vmdo", GOLDEN / "overlay-zstd-stream.vmds")
    print("wrote", *sorted(p.name for p in GOLDEN.iterdir()))
