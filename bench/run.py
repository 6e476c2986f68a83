#!/usr/bin/env python3
"""Comparison harness: vmdelta against the tools a user would otherwise pick, in the same run.

For each case (a set of base/modified artifact pairs) it runs ``vmdelta create`` and ``vmdelta
apply``, ``zstd -3`` and ``zstd -19`` with ``--long=31 --patch-from``, ``xdelta3 -9 -B``, and the
throwaway overlay model (``shared/tools/overlay-model.py``), measures size, wall time and peak RSS
of every process (``wait4``), checks that every rebuilt file is identical, and writes a Markdown
table with vmdelta's ratios to each tool.

    python bench/run.py                       # realistic-128: disk, memory, whole VM
    python bench/run.py --cases vm --skip zstd-19
    python bench/run.py --vmdelta-args "--encoder xor,raw --policy best"

Generic tools see one file at a time, so for several pairs their sizes and times are summed and
their peak RSS is the largest. Results go to stdout and ``bench/results/<set>.md``, drawn as a
chart beside it (``<set>.png``, by ``chart.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
from chart import write_chart  # beside this file

ROOT = Path(__file__).resolve().parent.parent


@attrs.define
class Run:
    seconds: float
    peak_rss: int  # bytes
    stdout: str


def measure(argv: list[str], *, env: dict[str, str] | None = None) -> Run:
    """Run a command; wall time and the peak RSS of that process (children included)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}): {err.strip()[-500:]}")
        out.seek(0)
        return Run(seconds, usage.ru_maxrss * 1024, out.read().decode(errors="replace"))


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


@attrs.define
class Result:
    tool: str
    size: int
    create: float
    create_rss: int
    apply: float | None
    apply_rss: int | None


def run_vmdelta(pairs: list[tuple[str, Path, Path]], work: Path, extra: list[str]) -> Result:
    vmdelta = [sys.executable, "-m", "vmdelta_core.cli"]
    env = {**os.environ, "VMDELTA_CACHE_DIR": str(work / "cache")}
    create = [*vmdelta, "create", "-q", "-o", str(work / "vm.overlay"), *extra]
    apply = [*vmdelta, "apply", "-q", str(work / "vm.overlay")]
    for kind, base, modified in pairs:
        create += [f"--{kind}", str(base), str(modified)]
        apply += [f"--{kind}", str(base), str(work / f"out-{modified.name}")]
    # the base index is built once per base and cached: time a create with a warm cache, as a
    # cloudlet holding its base would, after one run that builds it
    measure(create, env=env)
    c = measure(create, env=env)
    a = measure(apply, env=env)
    for _, _, modified in pairs:
        if not same(work / f"out-{modified.name}", modified):
            raise SystemExit(f"vmdelta rebuilt {modified.name} wrongly")
    return Result("vmdelta", (work / "vm.overlay").stat().st_size, c.seconds, c.peak_rss, a.seconds, a.peak_rss)


def run_zstd(level: int, pairs: list[tuple[str, Path, Path]], work: Path) -> Result:
    size = 0
    create = apply = 0.0
    c_rss = a_rss = 0
    for _, base, modified in pairs:
        patch, out = work / f"{modified.name}.zst{level}", work / f"{modified.name}.zst{level}.out"
        c = measure(
            ["zstd", f"-{level}", "--long=31", "-q", "-f", f"--patch-from={base}", str(modified), "-o", str(patch)]
        )
        a = measure(["zstd", "-d", "--long=31", "-q", "-f", f"--patch-from={base}", str(patch), "-o", str(out)])
        if not same(out, modified):
            raise SystemExit(f"zstd rebuilt {modified.name} wrongly")
        size += patch.stat().st_size
        create += c.seconds
        apply += a.seconds
        c_rss, a_rss = max(c_rss, c.peak_rss), max(a_rss, a.peak_rss)
        out.unlink()
    return Result(f"zstd -{level} --long=31 --patch-from", size, create, c_rss, apply, a_rss)


def run_xdelta3(pairs: list[tuple[str, Path, Path]], work: Path) -> Result:
    size = 0
    create = apply = 0.0
    c_rss = a_rss = 0
    for _, base, modified in pairs:
        window = 1 << max(base.stat().st_size - 1, 1).bit_length()
        patch, out = work / f"{modified.name}.vcdiff", work / f"{modified.name}.vcdiff.out"
        c = measure(["xdelta3", "-9", "-B", str(window), "-f", "-e", "-s", str(base), str(modified), str(patch)])
        a = measure(["xdelta3", "-B", str(window), "-f", "-d", "-s", str(base), str(patch), str(out)])
        if not same(out, modified):
            raise SystemExit(f"xdelta3 rebuilt {modified.name} wrongly")
        size += patch.stat().st_size
        create += c.seconds
        apply += a.seconds
        c_rss, a_rss = max(c_rss, c.peak_rss), max(a_rss, a.peak_rss)
        out.unlink()
    return Result("xdelta3 -9 -B", size, create, c_rss, apply, a_rss)


def run_model(pairs: list[tuple[str, Path, Path]], shared: Path) -> list[Result]:
    """The overlay model's figures (sizes only: it is a model, not a tool)."""
    model = shared / "tools" / "overlay-model.py"
    memory = next(((b, m) for k, b, m in pairs if k == "memory"), None)
    disk = next(((b, m) for k, b, m in pairs if k == "disk"), None)
    if not model.exists() or memory is None or disk is None or memory[0].suffix != ".mem":
        return []
    run = measure([sys.executable, str(model), str(memory[0]), str(memory[1]), str(disk[0]), str(disk[1])])
    return [
        Result(f"overlay model, zstd -{level}", int(size), float(sec), 0, None, None)
        for level, size, sec in re.findall(r"zstd -(\d+): (\d+) bytes \(([\d.]+) s\)", run.stdout)
    ]


def table(case: str, results: list[Result]) -> str:
    ours = results[0]
    lines = [
        f"### {case}",
        "",
        "| tool | overlay bytes | vmdelta size × | create s | vmdelta create × | create peak RSS MiB "
        "| vmdelta RSS × | apply s | vmdelta apply × | apply peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:

        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}" if a is not None and b else "–"

        rss = f"{r.create_rss / 2**20:.0f}" if r.create_rss else "–"
        arss = f"{r.apply_rss / 2**20:.0f}" if r.apply_rss else "–"
        create_ratio = ratio(ours.create, r.create) if r.create_rss else "–"
        lines.append(
            f"| {r.tool} | {r.size:,} | {ratio(ours.size, r.size)} | {r.create:.2f} | {create_ratio} "
            f"| {rss} | {ratio(ours.create_rss, r.create_rss) if r.create_rss else '–'} "
            f"| {'–' if r.apply is None else f'{r.apply:.2f}'} | {ratio(ours.apply, r.apply)} | {arss} |"
        )
    return "\n".join(lines) + "\n"


def cases(folder: Path) -> dict[str, list[tuple[str, Path, Path]]]:
    mem = [("memory", folder / "base.mem", folder / "modified.mem")]
    disk = [("disk", folder / "base.img", folder / "modified.img")]
    return {"disk": disk, "memory": mem, "vm": mem + disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--fixtures", type=Path, help="unpacked fixture set (default: realistic-128, unpacked on demand)"
    )
    parser.add_argument("--cases", default="disk,memory,vm", help="comma-separated: disk, memory, vm")
    parser.add_argument("--skip", default="", help="comma-separated tools to skip: zstd-3, zstd-19, xdelta3, model")
    parser.add_argument("--vmdelta-args", default="", help="extra arguments for vmdelta create")
    args = parser.parse_args()
    folder = args.fixtures
    if folder is None:
        from vmdelta_core.testing import real_fixtures

        folder = real_fixtures("realistic-128")
        if folder is None:
            raise SystemExit("no fixtures: pass --fixtures or make ../shared/fixtures and zstd available")
    skip = set(filter(None, args.skip.split(",")))
    for tool in ("zstd", "xdelta3"):
        if shutil.which(tool) is None:
            skip.add(tool if tool == "xdelta3" else "zstd-3")
            skip.add("zstd-19" if tool == "zstd" else tool)
    shared = Path(os.environ.get("VMDELTA_SHARED", ROOT.parent / "shared"))
    extra = shlex.split(args.vmdelta_args)
    report = [
        f"# vmdelta benchmark: {folder.name}",
        "",
        f"vmdelta create {shlex.join(extra) or '(defaults)'}; {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Ratios are vmdelta ÷ tool: below 1 is better for vmdelta.",
        "",
    ]
    for case in filter(None, args.cases.split(",")):
        pairs = cases(folder)[case]
        with tempfile.TemporaryDirectory(prefix="vmdelta-bench-") as tmp:
            work = Path(tmp)
            results = [run_vmdelta(pairs, work, extra)]
            if "zstd-3" not in skip:
                results.append(run_zstd(3, pairs, work))
            if "zstd-19" not in skip:
                results.append(run_zstd(19, pairs, work))
            if "xdelta3" not in skip:
                results.append(run_xdelta3(pairs, work))
            if "model" not in skip:
                results += run_model(pairs, shared)
        text = table(f"{case}: " + ", ".join(m.name for _, _, m in pairs), results)
        print(text, flush=True)
        report.append(text)
    out = ROOT / "bench" / "results" / f"{folder.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print(f"written to {out}")
    print(f"chart written to {write_chart(out)}")


if __name__ == "__main__":
    main()
