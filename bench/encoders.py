#!/usr/bin/env python3
"""Encoders on the real captures: speed, acceptance, and what they do to the final overlay size.

Run directly (not a test): ``python bench/encoders.py [--fixtures DIR]``. Needs vmdelta-core and
the four encoder plugins installed; the whole-file comparisons need the ``zstd`` and ``xdelta3``
commands. It prints Markdown tables:

1. per encoder and image: how many of the changed units it accepts, microseconds per unit to
   encode and decode (one thread, and a two-thread pool over batches as the core runs them),
   payload bytes of the accepted units against their raw bytes, and the bytes of the items after
   zstd -9 in 4 MiB frames (what an overlay's frames hold) when every unit it accepts is stored
   with it and the rest raw;
2. the selection policies ``first-smaller`` and ``best`` over lists of encoders;
3. the whole files through ``zstd -19 --long=31 --patch-from`` and ``xdelta3 -9 -B``;
4. real overlays written by ``vmdelta_core.api.create_overlay`` for the candidate defaults.

The units are the ones an overlay encodes: changed 4 KiB units at the same offset, after
removing zero units, units found anywhere in the base memory or disk, and repeats.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import zstandard

from vmdelta_core.overlay.items import pack_items

UNIT = 4096
BATCH = 256  # units per encode call, as the core's encoding policy batches them
FRAME = 4 << 20  # the core's default frame size
FRAME_LEVEL = 9  # the core's default zstd level for frames


@attrs.frozen
class Units:
    """The units of one image that an overlay has to encode, in address order."""

    kind: str
    offsets: np.ndarray
    bases: list[bytes]
    targets: list[bytes]
    changed: int
    deduplicated: int
    zero_base: int


def _unit_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def load_units(pairs: dict[str, tuple[Path, Path]]) -> dict[str, Units]:
    """Changed units minus what dedup removes: zeros, units in either base image, repeats."""
    maps = {
        kind: (np.memmap(b, dtype=np.uint8, mode="r"), np.memmap(m, dtype=np.uint8, mode="r"))
        for kind, (b, m) in pairs.items()
    }
    in_base = set()
    for base, _ in maps.values():
        for i in range(base.size // UNIT):
            in_base.add(_unit_digest(base[i * UNIT : (i + 1) * UNIT].tobytes()))
    seen: set[bytes] = set()
    out = {}
    for kind, (base, modified) in maps.items():
        n = min(base.size, modified.size) // UNIT
        changed = np.concatenate(
            [
                start
                + np.flatnonzero(
                    (
                        base[start * UNIT : stop * UNIT].reshape(-1, UNIT)
                        != modified[start * UNIT : stop * UNIT].reshape(-1, UNIT)
                    ).any(axis=1)
                )
                for start, stop in ((s, min(s + 8192, n)) for s in range(0, n, 8192))
            ]
        )
        offsets, bases, targets = [], [], []
        for i in changed.tolist():
            target = modified[i * UNIT : (i + 1) * UNIT].tobytes()
            if not any(target):
                continue
            digest = _unit_digest(target)
            if digest in in_base or digest in seen:
                continue
            seen.add(digest)
            offsets.append(i * UNIT)
            bases.append(base[i * UNIT : (i + 1) * UNIT].tobytes())
            targets.append(target)
        out[kind] = Units(
            kind,
            np.array(offsets, dtype=np.uint64),
            bases,
            targets,
            int(changed.size),
            int(changed.size) - len(targets),
            sum(1 for b in bases if not any(b)),
        )
    return out


def frame_bytes(units: Units, stored: Sequence[bytes], is_raw: Sequence[bool]) -> int:
    """Bytes of these items once packed and compressed like an overlay's frames (zstd -9, 4 MiB)."""
    item_type = 1 if units.kind == "memory" else 2
    groups, start, size = [], 0, 0
    for i, payload in enumerate(stored):
        size += len(payload) + 19
        if size >= FRAME:
            groups.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(stored):
        groups.append((start, len(stored)))

    def compressed(group: tuple[int, int]) -> int:
        a, b = group
        frame = pack_items(
            units.offsets[a:b],
            [len(t) for t in units.targets[a:b]],
            [1 if raw else 0xA for raw in is_raw[a:b]],
            [item_type] * (b - a),
            [0] * (b - a),
            stored[a:b],
        )
        return len(zstandard.ZstdCompressor(level=FRAME_LEVEL).compress(frame))

    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(compressed, groups))


def estimate_best(targets: Sequence[bytes], candidates: Sequence[Sequence[bytes | None]]) -> list[bytes | None]:
    """The core's ``best`` rule: per unit, the smallest zstd -1 estimate; ``None`` is raw."""
    estimate = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=False).compress
    chosen: list[bytes | None] = []
    for i, target in enumerate(targets):
        best, pick = len(estimate(target)) + 8, None
        for payloads in candidates:
            payload = payloads[i]
            if payload is None or len(payload) >= len(target):
                continue
            size = min(len(payload), len(estimate(payload)))
            if size < best:
                best, pick = size, payload
        chosen.append(pick)
    return chosen


Factory = Callable[[], Any]


def encoder_variants() -> dict[str, Factory]:
    """Every encoder configuration measured, by the label the tables use."""
    from vmdelta_encoder_bsdiff import BsdiffEncoder
    from vmdelta_encoder_xdelta3 import Xdelta3Encoder
    from vmdelta_encoder_xor import XorEncoder
    from vmdelta_encoder_zstd import ZstdEncoder

    from vmdelta_core.builtin.raw import RawEncoder

    return {
        "raw": RawEncoder,
        "xdelta3 -0": lambda: Xdelta3Encoder(level=0),
        "xdelta3 -1": lambda: Xdelta3Encoder(level=1),
        "xdelta3 -9": lambda: Xdelta3Encoder(level=9),
        "bsdiff": BsdiffEncoder,
        "xor (runs)": XorEncoder,
        "xor (plain)": lambda: XorEncoder(mode="plain"),
        "zstd -3": lambda: ZstdEncoder(level=3),
        "zstd -19": lambda: ZstdEncoder(level=19),
    }


def _batches(n: int) -> list[slice]:
    return [slice(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


def _timed(fn: Callable[[slice], list[Any]], n: int, threads: int) -> tuple[list[Any], float]:
    """Run ``fn`` over batches of the units, on one thread or a pool; (results, seconds).

    Two threads finishing in about half the time of one is the sign that the encoder drops the
    GIL; on a machine busy with other work the ratio says less.
    """
    started = time.perf_counter()
    if threads == 1:
        parts = [fn(s) for s in _batches(n)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(fn, _batches(n)))
    elapsed = time.perf_counter() - started
    return [x for part in parts for x in part], elapsed


def measure(label: str, factory: Factory, units: Units) -> dict[str, Any]:
    encoder = factory()
    bases = [memoryview(b) for b in units.bases]
    targets = [memoryview(t) for t in units.targets]
    n = len(targets)
    payloads, enc1 = _timed(lambda s: encoder.encode(bases[s], targets[s]), n, 1)
    again, enc2 = _timed(lambda s: encoder.encode(bases[s], targets[s]), n, 2)
    assert again == payloads, f"{label}: payloads differ between one and two threads"
    kept = [i for i, p in enumerate(payloads) if p is not None]
    k_bases = [bases[i] for i in kept]
    k_payloads = [memoryview(payloads[i]) for i in kept]
    k_lengths = [len(targets[i]) for i in kept]
    decoded, dec1 = _timed(lambda s: encoder.decode(k_bases[s], k_payloads[s], k_lengths[s]), len(kept), 1)
    _, dec2 = _timed(lambda s: encoder.decode(k_bases[s], k_payloads[s], k_lengths[s]), len(kept), 2)
    for i, unit in zip(kept, decoded, strict=True):
        assert unit == units.targets[i], f"{label}: unit {i} does not round-trip"
    stored = [p if p is not None else units.targets[i] for i, p in enumerate(payloads)]
    is_raw = [p is None for p in payloads] if label != "raw" else [True] * n
    return {
        "label": label,
        "payloads": payloads,
        "accepted": len(kept),
        "units": n,
        "enc1": enc1 / max(n, 1) * 1e6,
        "enc2": enc2 / max(n, 1) * 1e6,
        "dec1": dec1 / max(len(kept), 1) * 1e6,
        "dec2": dec2 / max(len(kept), 1) * 1e6,
        "payload_bytes": sum(len(payloads[i]) for i in kept),
        "raw_bytes": sum(k_lengths),
        "frames": frame_bytes(units, stored, is_raw),
    }


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def encoder_table(kind: str, units: Units, rows: list[dict[str, Any]]) -> str:
    raw_frames = next(r["frames"] for r in rows if r["label"] == "raw")
    lines = [
        f"### {kind}: {len(units.targets)} units to encode "
        f"({units.changed} changed; {units.deduplicated} zero or found elsewhere)",
        "",
        "| encoder | accepted | encode µs/unit (1 / 2 threads) | decode µs/unit (1 / 2 threads) "
        "| payload / raw bytes of accepted | items after zstd -9 | vs raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {100 * r['accepted'] / max(r['units'], 1):.1f}% "
            f"| {r['enc1']:.1f} / {r['enc2']:.1f} | {r['dec1']:.1f} / {r['dec2']:.1f} "
            f"| {_fmt(r['payload_bytes'])} / {_fmt(r['raw_bytes'])} | {_fmt(r['frames'])} "
            f"| {100 * r['frames'] / raw_frames:.1f}% |"
        )
    return "\n".join(lines)


POLICY_LISTS: list[tuple[str, ...]] = [
    ("xor (runs)",),
    ("xdelta3 -0",),
    ("xdelta3 -9",),
    ("zstd -3",),
    ("bsdiff",),
    ("xor (runs)", "xdelta3 -0"),
    ("xor (runs)", "zstd -3"),
    ("xor (runs)", "xdelta3 -0", "zstd -3"),
    ("xor (runs)", "xdelta3 -0", "bsdiff", "zstd -3"),
]


def policy_rows(units: Units, measured: dict[str, dict[str, Any]]) -> list[tuple[str, str, int, int]]:
    """(policy, encoder list, units not stored raw, item bytes after zstd -9) for each list."""
    out = []
    for names in POLICY_LISTS:
        if not all(name in measured for name in names):
            continue
        candidates = [measured[name]["payloads"] for name in names]
        for policy in ("first-smaller", "best"):
            if policy == "first-smaller":
                chosen = []
                for i, target in enumerate(units.targets):
                    pick = next((c[i] for c in candidates if c[i] is not None and len(c[i]) < len(target)), None)
                    chosen.append(pick)
            else:
                chosen = estimate_best(units.targets, candidates)
            stored = [c if c is not None else units.targets[i] for i, c in enumerate(chosen)]
            frames = frame_bytes(units, stored, [c is None for c in chosen])
            out.append((policy, " → ".join(names), sum(c is not None for c in chosen), frames))
    return out


def whole_file_tools(pairs: dict[str, tuple[Path, Path]], scratch: Path) -> list[tuple[str, str, int, float]]:
    """(image, tool, bytes, seconds) for zstd --patch-from and xdelta3 on the whole files."""
    rows = []
    for kind, (base, modified) in pairs.items():
        size = base.stat().st_size
        tools = {
            "zstd -19 --long=31 --patch-from": (
                ["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={base}", str(modified), "-o"],
                "zstd",
            ),
            "xdelta3 -9 -B": (
                ["xdelta3", "-f", "-e", "-9", "-B", str(size), "-s", str(base), str(modified)],
                "xdelta3",
            ),
        }
        for label, (command, program) in tools.items():
            if shutil.which(program) is None:
                continue
            out = scratch / f"{kind}.{program}"
            started = time.perf_counter()
            subprocess.run([*command, str(out)], check=True, stdout=subprocess.DEVNULL)
            rows.append((kind, label, out.stat().st_size, time.perf_counter() - started))
            out.unlink()
    return rows


def overlay_rows(
    pairs: dict[str, tuple[Path, Path]],
    configs: Sequence[tuple[str, tuple[str, ...], str]],
    scratch: Path,
    *,
    compare: bool,
) -> list[tuple[str, int, float, float]]:
    """(config, overlay bytes, create seconds, apply seconds) from the real pipeline.

    ``apply_overlay`` verifies the rebuilt images against the digests in the overlay; with
    ``compare`` the rebuilt files are also compared with the modified ones here.
    """
    from vmdelta_core.api import ApplyConfig, ApplyImageSpec, CreateConfig, ImageSpec, apply_overlay, create_overlay

    rows = []
    for label, encoders, policy in configs:
        out = scratch / "bench.vmd"
        images = [
            ImageSpec(kind, base, modified, encoders=encoders, policy=policy)
            for kind, (base, modified) in pairs.items()
        ]
        started = time.perf_counter()
        create_overlay(CreateConfig(out, images, threads=2, cache_dir=scratch / "cache"))
        created = time.perf_counter() - started
        size = out.stat().st_size
        started = time.perf_counter()
        apply_overlay(
            ApplyConfig(
                out,
                [ApplyImageSpec(kind, base, scratch / f"rebuilt-{kind}") for kind, (base, _) in pairs.items()],
                threads=2,
                cache_dir=scratch / "cache",
            )
        )
        applied = time.perf_counter() - started
        for kind, (_, modified) in pairs.items():
            rebuilt = scratch / f"rebuilt-{kind}"
            assert not compare or _digest(rebuilt) == _digest(modified), f"{label}: rebuilt {kind} differs"
            rebuilt.unlink()
        rows.append((label, size, created, applied))
    return rows


def _reads_streams() -> bool:
    from vmdelta_core.registry import default_registry

    return "qemu" in default_registry().names("source")


def _overlay_model(streams: dict[str, tuple[Path, Path]]) -> str | None:
    """The output of ``shared/tools/overlay-model.py`` on the same files, if it is around."""
    here = Path(__file__).resolve()
    tool = next(
        (
            p / "shared" / "tools" / "overlay-model.py"
            for p in here.parents
            if (p / "shared" / "tools" / "overlay-model.py").is_file()
        ),
        None,
    )
    if tool is None:
        return None
    args = [str(streams["memory"][0]), str(streams["memory"][1]), str(streams["disk"][0]), str(streams["disk"][1])]
    done = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _digest(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, help="the realistic-128 fixture folder (default: unpack it)")
    parser.add_argument("--only", help="comma-separated encoder labels to measure (default: all)")
    parser.add_argument("--no-tools", action="store_true", help="skip the whole-file zstd / xdelta3 runs")
    parser.add_argument("--no-overlays", action="store_true", help="skip the real create/apply runs")
    args = parser.parse_args(argv)
    fixtures = args.fixtures
    if fixtures is None:
        from vmdelta_core.testing import real_fixtures

        fixtures = real_fixtures()
        if fixtures is None:
            raise SystemExit("the real fixtures are not available; pass --fixtures DIR")
    ram = fixtures / "variants" / "qemu-7.2-ignore-shared"
    pairs = {
        "memory": (ram / "base-ram.raw", ram / "modified-ram.raw"),
        "disk": (fixtures / "base.img", fixtures / "modified.img"),
    }
    variants = encoder_variants()
    if args.only:
        wanted = ["raw", *(s.strip() for s in args.only.split(","))]
        variants = {k: v for k, v in variants.items() if k in wanted}
    print(f"# Encoders on {fixtures.name} (unit {UNIT} B, batches of {BATCH}, zstd {zstandard.__version__})\n")
    all_units = load_units(pairs)
    totals: dict[str, int] = {}
    for kind, units in all_units.items():
        measured = {label: measure(label, factory, units) for label, factory in variants.items()}
        print(encoder_table(kind, units, list(measured.values())) + "\n")
        print(f"#### {kind}: policies (items after zstd -9; raw only: {_fmt(measured['raw']['frames'])})\n")
        print("| policy | encoders | units not raw | items after zstd -9 | vs raw |\n|---|---|---:|---:|---:|")
        for policy, names, taken, frames in policy_rows(units, measured):
            print(
                f"| {policy} | {names} | {taken} | {_fmt(frames)} | {100 * frames / measured['raw']['frames']:.1f}% |"
            )
            totals[f"{policy}: {names}"] = totals.get(f"{policy}: {names}", 0) + frames
        totals["raw only"] = totals.get("raw only", 0) + measured["raw"]["frames"]
        print()
    with tempfile.TemporaryDirectory(prefix="vmdelta-bench-") as tmp:
        scratch = Path(tmp)
        if not args.no_tools:
            print("### Whole files\n\n| image | tool | bytes | seconds |\n|---|---|---:|---:|")
            for kind, label, size, seconds in whole_file_tools(pairs, scratch):
                print(f"| {kind} | {label} | {_fmt(size)} | {seconds:.1f} |")
            print()
        if not args.no_overlays:
            configs = [
                ("raw only", ("raw",), "fixed"),
                ("best: xor", ("xor",), "best"),
                ("best: xor → xdelta3", ("xor", "xdelta3"), "best"),
                ("best: xor → xdelta3 → zstd", ("xor", "xdelta3", "zstd"), "best"),
                ("first-smaller: xor", ("xor",), "first-smaller"),
                ("first-smaller: xor → xdelta3", ("xor", "xdelta3"), "first-smaller"),
                ("fixed: zstd", ("zstd",), "fixed"),
            ]
            scenarios = {"raw RAM (ignore-shared) + disk": pairs}
            streams = {"memory": (fixtures / "base.mem", fixtures / "modified.mem"), "disk": pairs["disk"]}
            if _reads_streams():
                scenarios["QEMU 7.2 migration streams + disk"] = streams
            for title, scenario in scenarios.items():
                print(f"### Real overlays: {title} (create_overlay / apply_overlay, 2 threads, verified)\n")
                print("| configuration | overlay bytes | vs raw only | create s | apply s |\n|---|---:|---:|---:|---:|")
                rows = overlay_rows(scenario, configs, scratch, compare=scenario is pairs)
                for label, size, created, applied in rows:
                    print(
                        f"| {label} | {_fmt(size)} | {100 * size / rows[0][1]:.1f}% | {created:.1f} | {applied:.1f} |"
                    )
                print()
            model = _overlay_model(streams)
            if model:
                print("### overlay-model.py (dedup + zstd over raw units, no encoders) on the streams + disk\n")
                print("```\n" + model + "\n```")


if __name__ == "__main__":
    main()
