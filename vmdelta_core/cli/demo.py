"""``vmdelta demo``: the whole job on a small real sample that ships with vmdelta.

The sample is two 16 MiB windows cut from a real capture (a Debian guest's RAM and its ext4 disk,
before and after it read, edited, copied and deleted files), stored zstd-compressed: the modified
halves against their bases as dictionaries.
"""

from __future__ import annotations

import filecmp
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import zstandard

from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay
from vmdelta_core.cli.output import console, print_json, progress_for, render_overlay
from vmdelta_core.errors import IntegrityError

__all__ = ["run_demo", "unpack_sample"]

_LIMIT = 64 << 20


def unpack_sample(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Write the sample's base and modified images into ``folder``; returns {kind: (base, modified)}."""
    data = resources.files("vmdelta_core") / "data"
    description = json.loads((data / "sample.json").read_text())
    pairs = {}
    for kind in description["images"]:
        base = zstandard.ZstdDecompressor().decompress((data / f"{kind}-base.zst").read_bytes(), max_output_size=_LIMIT)
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        modified = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
            (data / f"{kind}-modified.zst").read_bytes(), max_output_size=_LIMIT
        )
        suffix = "mem" if kind == "memory" else "img"
        pairs[kind] = (folder / f"base.{suffix}", folder / f"modified.{suffix}")
        pairs[kind][0].write_bytes(base)
        pairs[kind][1].write_bytes(modified)
    return pairs


def run_demo(keep: Path | None, *, quiet: bool = False, as_json: bool = False, **options: Any) -> int:
    with tempfile.TemporaryDirectory(prefix="vmdelta-demo-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        pairs = unpack_sample(folder)
        overlay = folder / "demo.overlay"
        options.setdefault("cache_dir", folder / "cache")
        images = [
            ImageSpec(kind, base, modified)
            for kind, (base, modified) in sorted(pairs.items(), key=lambda kv: kv[0] != "memory")
        ]
        with progress_for(quiet or as_json) as progress:
            created = create_overlay(CreateConfig(output=overlay, images=images, **options), progress=progress)
            outputs = {kind: folder / f"rebuilt.{'mem' if kind == 'memory' else 'img'}" for kind in pairs}
            applied = apply_overlay(
                ApplyConfig(
                    overlay=overlay,
                    images=[ApplyImageSpec(spec.kind, spec.base, outputs[spec.kind]) for spec in images],
                    **options,
                ),
                progress=progress,
            )
        for kind, (_, modified) in pairs.items():
            if not filecmp.cmp(modified, outputs[kind], shallow=False):
                raise IntegrityError(f"demo: rebuilt {kind} differs from the modified image")
        modified_bytes = sum(m.stat().st_size for _, m in pairs.values())
        if as_json:
            print_json(
                {
                    "overlay_bytes": created.size,
                    "modified_bytes": modified_bytes,
                    "create_seconds": round(created.seconds, 3),
                    "apply_seconds": round(applied.seconds, 3),
                    "identical": True,
                    "statistics": {i.name: i.statistics.to_json() for i in created.images},
                }
            )
        elif not quiet:
            render_overlay(created.metadata, size=created.size)
            console.print(
                f"demo: {len(pairs)} images, {modified_bytes >> 20} MiB modified -> overlay of {created.size} bytes "
                f"({created.size / modified_bytes:.1%}); created in {created.seconds:.2f} s, applied in "
                f"{applied.seconds:.2f} s; every rebuilt image is identical to the modified one, byte for byte"
            )
            if keep:
                console.print(f"demo files kept in {folder}")
    return 0
