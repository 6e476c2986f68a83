#!/usr/bin/env python3
"""Disk overlays on the real captures: vmdelta against the tools a user would otherwise pick.

Run directly (not a test): ``python bench/disks.py [--fixtures DIR] [--work DIR] [--big]``.
It prints one Markdown table: per input (the raw pair, the modified disk as a qcow2 overlay of
the base, optionally a 64 GiB sparse pair) and method, the time and peak memory of creating
the overlay and of rebuilding the disk from it, the overlay's size, what the rebuilt disk
occupies, and whether it is identical to the modified disk (``qemu-img compare``).

Methods:

* ``vmdelta`` through its command line (``vmdelta create`` / ``vmdelta apply``), when it is
  installed next to this Python or on ``PATH``: raw output, and thin qcow2 output
  (``apply --disk-format qcow2``: a qcow2 backed by the base). Base indexes go to a fresh cache
  folder per input, so ``create`` pays for indexing the base and ``apply`` finds it cached.
* ``zstd -19 --long=31 --patch-from=BASE`` and ``xdelta3 -9 -B`` over the whole raw files.
* the qcow2 overlay route: ``qemu-img create -b modified`` + ``qemu-img rebase -b base`` (the
  clusters that differ) + ``qemu-img convert -c -B base`` (compressed, still backed by the base);
  "apply" is ``qemu-img convert -O raw`` (a VM could boot the overlay as it is).

Needs ``qemu-img`` (qemu-utils); ``zstd`` and ``xdelta3`` rows are skipped when the commands are
missing. Nothing here is a test: numbers vary with the machine, so the table is the output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

GiB = 1 << 30
NA = "n/a"


@attrs.frozen
class Run:
    seconds: float
    peak_rss: int  # bytes


@attrs.frozen
class Row:
    case: str
    method: str
    create: Run | None
    overlay: int | None
    apply: Run | None
    output_bytes: int | None  # allocated on disk
    identical: bool | None
    note: str = ""


def run(args: Sequence[str | Path], env: dict[str, str] | None = None) -> Run:
    """Run a command to completion; its wall time and its own peak RSS (from wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): {err.strip()[-400:]}")
    return Run(seconds, usage.ru_maxrss * 1024)


def combine(*runs: Run) -> Run:
    return Run(sum(r.seconds for r in runs), max(r.peak_rss for r in runs))


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def same_disk(a: Path, b: Path) -> bool:
    """Guest-visible equality, whatever the formats (qemu-img compare reads holes cheaply)."""
    fmt = []
    for flag, path in (("-f", a), ("-F", b)):
        with open(path, "rb") as f:
            fmt += [flag, "qcow2" if f.read(4) == b"QFI\xfb" else "raw"]
    result = subprocess.run(["qemu-img", "compare", *fmt, str(a), str(b)], capture_output=True)
    return result.returncode == 0


def vmdelta_command() -> Path | None:
    beside = Path(sys.executable).with_name("vmdelta")
    if beside.exists():
        return beside
    found = shutil.which("vmdelta")
    return Path(found) if found else None


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------


def bench_vmdelta(case: str, base: Path, modified: Path, reference: Path, work: Path, qcow2_input: bool) -> list[Row]:
    cli = vmdelta_command()
    if cli is None:
        return [Row(case, "vmdelta", None, None, None, None, None, "vmdelta CLI not installed")]
    env = {**os.environ, "VMDELTA_CACHE_DIR": str(work / "cache")}
    overlay = work / "vm.overlay"
    created = run([cli, "create", "-q", "-o", overlay, "--disk", base, modified], env)
    rows = []
    outputs = [("raw", "--disk-format", "raw"), ("thin qcow2", "--disk-format", "qcow2")]
    if qcow2_input:  # default output is the input format: a qcow2 over the base
        outputs = [("qcow2 (default)", None, None), ("raw", "--disk-format", "raw")]
    for label, flag, value in outputs:
        out = work / f"rebuilt.{'qcow2' if 'qcow2' in label else 'img'}"
        out.unlink(missing_ok=True)
        extra = [flag, value] if flag else []
        applied = run([cli, "apply", "-q", overlay, "--disk", base, out, *extra], env)
        rows.append(
            Row(
                case,
                f"vmdelta -> {label}",
                created,
                overlay.stat().st_size,
                applied,
                allocated(out),
                same_disk(out, reference),
            )
        )
        out.unlink()
    return rows


def bench_zstd(case: str, base: Path, reference: Path, work: Path, level: int) -> Row:
    if shutil.which("zstd") is None:
        return Row(case, "zstd --patch-from", None, None, None, None, None, "zstd not installed")
    patch, out = work / "patch.zst", work / "zstd.img"
    window = max(27, min(31, (max(base.stat().st_size, reference.stat().st_size) - 1).bit_length()))
    created = run(
        ["zstd", "-q", "-f", f"-{level}", f"--long={window}", "-T1", f"--patch-from={base}", reference, "-o", patch]
    )
    applied = run(["zstd", "-q", "-f", "-d", f"--long={window}", f"--patch-from={base}", patch, "-o", out])
    row = Row(
        case,
        f"zstd -{level} --long={window} --patch-from",
        created,
        patch.stat().st_size,
        applied,
        allocated(out),
        same_disk(out, reference),
    )
    out.unlink()
    return row


def bench_xdelta3(case: str, base: Path, reference: Path, work: Path) -> Row:
    if shutil.which("xdelta3") is None:
        return Row(case, "xdelta3", None, None, None, None, None, "xdelta3 not installed")
    patch, out = work / "patch.vcdiff", work / "xdelta3.img"
    window = 1 << max(base.stat().st_size - 1, 1).bit_length()
    window = min(window, 1 << 31)  # xdelta3's largest source window
    created = run(["xdelta3", "-f", "-e", "-9", "-B", str(window), "-s", base, reference, patch])
    applied = run(["xdelta3", "-f", "-d", "-B", str(window), "-s", base, patch, out])
    row = Row(case, "xdelta3 -9 -B", created, patch.stat().st_size, applied, allocated(out), same_disk(out, reference))
    out.unlink()
    return row


def qcow2_overlay(base: Path, modified_raw: Path, dest: Path) -> Run:
    """The clusters where ``modified_raw`` differs from ``base``, as a qcow2 backed by ``base``."""
    dest.unlink(missing_ok=True)
    return combine(
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", modified_raw.resolve(), "-F", "raw", dest]),
        run(["qemu-img", "rebase", "-q", "-b", base.resolve(), "-F", "raw", dest]),
    )


def bench_qcow2_route(case: str, base: Path, modified: Path, reference: Path, work: Path, qcow2_input: bool) -> Row:
    overlay, compressed, out = work / "route.qcow2", work / "route-c.qcow2", work / "route.img"
    steps = []
    if not qcow2_input:
        steps.append(qcow2_overlay(base, modified, overlay))
    else:
        overlay = modified
    compressed.unlink(missing_ok=True)
    steps.append(
        run(["qemu-img", "convert", "-c", "-O", "qcow2", "-B", base.resolve(), "-F", "raw", overlay, compressed])
    )
    applied = run(["qemu-img", "convert", "-O", "raw", compressed, out])
    note = "create: convert -c only (the input is the overlay)" if qcow2_input else "create: rebase + convert -c"
    row = Row(
        case,
        "qcow2 overlay (rebase + convert -c)",
        combine(*steps),
        compressed.stat().st_size,
        applied,
        allocated(out),
        same_disk(out, reference),
        note + "; apply: convert -O raw",
    )
    out.unlink()
    return row


# ------------------------------------------------------------------------------------------------
# inputs and report
# ------------------------------------------------------------------------------------------------


def sparse_copy(src: Path, dest: Path, size: int, offsets: Sequence[int]) -> None:
    """A sparse file of ``size`` bytes holding ``src``'s data at each of ``offsets``."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.truncate(size)
        end = os.fstat(fin.fileno()).st_size
        for base_offset in offsets:
            pos = 0
            while pos < end:
                try:
                    data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                except OSError:
                    break
                hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                os.copy_file_range(fin.fileno(), fout.fileno(), hole - data, data, base_offset + data)
                pos = hole


def human(n: int | None) -> str:
    if n is None:
        return NA
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def table(rows: list[Row]) -> str:
    lines = [
        "| input | method | create s | create RSS | overlay | apply s | apply RSS | rebuilt on disk | identical "
        "| note |",
        "|---|---|--:|--:|--:|--:|--:|--:|:-:|---|",
    ]
    for r in rows:
        c, a = r.create, r.apply
        lines.append(
            f"| {r.case} | {r.method} | {f'{c.seconds:.2f}' if c else NA} | {human(c.peak_rss) if c else NA} "
            f"| {human(r.overlay)} | {f'{a.seconds:.2f}' if a else NA} | {human(a.peak_rss) if a else NA} "
            f"| {human(r.output_bytes)} | {NA if r.identical is None else ('yes' if r.identical else 'NO')} "
            f"| {r.note} |"
        )
    return "\n".join(lines)


def versions() -> str:
    """One line naming the tools measured, with their versions."""
    out = []
    for cmd in (["qemu-img", "--version"], ["zstd", "--version"], ["xdelta3", "-V"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError:
            out.append(f"{cmd[0]} not installed")
            continue
        words = (done.stdout or done.stderr).split()
        version = next((w.strip("v,") for w in words if w[:1].isdigit() or w[:2] in ("v1", "v2")), "?")
        out.append(f"{cmd[0]} {version}")
    cli = vmdelta_command()
    if cli:
        out.append(subprocess.run([cli, "--version"], capture_output=True, text=True).stdout.strip())
    return ", ".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, help="fixture set folder (default: real_fixtures())")
    parser.add_argument("--work", type=Path, help="scratch folder on a real disk (default: a temporary one)")
    parser.add_argument("--zstd-level", type=int, default=19)
    parser.add_argument(
        "--big", action="store_true", help="also a 4 GiB and a 64 GiB sparse pair (vmdelta and qcow2 only)"
    )
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    fixtures = args.fixtures
    if fixtures is None:
        from vmdelta_core.testing import real_fixtures

        fixtures = real_fixtures()
    if fixtures is None or shutil.which("qemu-img") is None:
        print("needs the real fixtures and qemu-img (qemu-utils)", file=sys.stderr)
        return 2
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.work, prefix="vmdelta-bench-disks-") as tmp:
        work = Path(tmp)
        base, modified = fixtures / "base.img", fixtures / "modified.img"
        case = f"raw pair, {human(base.stat().st_size)}"
        (work / "raw").mkdir()
        rows += bench_vmdelta(case, base, modified, modified, work / "raw", qcow2_input=False)
        rows.append(bench_zstd(case, base, modified, work / "raw", args.zstd_level))
        rows.append(bench_xdelta3(case, base, modified, work / "raw"))
        rows.append(bench_qcow2_route(case, base, modified, modified, work / "raw", qcow2_input=False))

        (work / "qcow2").mkdir()
        thin = work / "qcow2" / "modified.qcow2"
        qcow2_overlay(base, modified, thin)
        case = f"qcow2 overlay of the base ({human(allocated(thin))})"
        rows += bench_vmdelta(case, base, thin, modified, work / "qcow2", qcow2_input=True)
        rows.append(bench_qcow2_route(case, base, thin, modified, work / "qcow2", qcow2_input=True))

        # the same data in ever larger images: what vmdelta's time and memory follow
        for size, offsets in ((4 * GiB, [0, 3 * GiB]), (64 * GiB, [0, 40 * GiB])) if args.big else ():
            folder = work / f"big{size // GiB}"
            folder.mkdir()
            big_base, big_mod = folder / "base.img", folder / "modified.img"
            sparse_copy(base, big_base, size, offsets)
            sparse_copy(modified, big_mod, size, offsets)
            case = f"raw pair, {size // GiB} GiB sparse (2 copies of the fixture)"
            rows += bench_vmdelta(case, big_base, big_mod, big_mod, folder, qcow2_input=False)
            rows.append(bench_qcow2_route(case, big_base, big_mod, big_mod, folder, qcow2_input=False))
    report = f"Disk overlays — {fixtures.name}\n\n{versions()}\n\n{table(rows)}\n"
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0 if all(r.identical is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
