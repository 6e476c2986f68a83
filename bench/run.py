#!/usr/bin/env python3
"""Comparison harness: vmdelta against the tools a user would otherwise pick, in the same run.

For each case (a set of base/modified artifact pairs) it runs ``vmdelta create`` and ``vmdelta
apply`` (the file form, and the stream form through ``create -o -`` and ``apply -``), ``zstd -3
-T2`` and ``zstd -19`` with ``--long=31 --patch-from``, ``xdelta3 -9 -B``, and the throwaway
overlay model (``shared/tools/overlay-model.py``), measures size, wall time and peak RSS of every
process (``wait4``), checks that every rebuilt file is identical, and writes a Markdown table with
vmdelta's ratios to each tool. ``vmdelta apply`` flushes its outputs to disk before it names them;
``zstd -d`` leaves them in the page cache, so zstd -3 has a second row whose apply also waits for
that flush (``-d then fsync``), timed by this harness. Every tool runs ``--runs`` times, the tools taking turns (a round
runs each once), and the table gives each one's median: a machine whose speed drifts during the
run moves every tool alike. A last table times start-up: ``vmdelta --help``, and ``vmdelta apply``
up to its first work (opening its overlay), against a bare Python and against a Python that only
imports the libraries any overlay is read with (numpy, attrs, construct: the floor of that start).

vmdelta runs as an installed tool does: with its bytecode cached (``PYTHONDONTWRITEBYTECODE`` is
dropped, the cache goes to the work folder, and one unmeasured run of each command fills it).

    python bench/run.py                       # realistic-128: disk, memory, whole VM
    python bench/run.py --cases vm --skip zstd-19
    python bench/run.py --vmdelta-args "--encoder xor,raw --policy best"
    python bench/run.py --size-mode --skip zstd-3,model --runs 1   # --level max against zstd -19

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
import statistics
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


def measure(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    stdin: Path | None = None,
    stdout: Path | None = None,
    ok: int = 0,
) -> Run:
    """Run a command; wall time and the peak RSS of that process (children included).

    :param stdin: a file given as its standard input; ``stdout``: a file its output goes to
        (else it is returned); ``ok``: the exit status expected.
    """
    started = time.perf_counter()
    target = open(stdout, "w+b") if stdout else tempfile.TemporaryFile()  # noqa: SIM115
    with target as out, open(stdin or os.devnull, "rb") as source:
        proc = subprocess.Popen(argv, stdin=source, stdout=out, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != ok:
            raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}): {err.strip()[-500:]}")
        out.seek(0)
        return Run(seconds, usage.ru_maxrss * 1024, "" if stdout else out.read().decode(errors="replace"))


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


VMDELTA = [sys.executable, "-m", "vmdelta_core.cli"]
STREAM_FORM = "vmdelta, stream form (create -o -, apply -)"
COLD_INDEX = "vmdelta, bases not indexed before (create only)"


def vmdelta_env(work: Path) -> dict[str, str]:
    """vmdelta's environment: its base index cache and its bytecode cache in ``work``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "VMDELTA_CACHE_DIR": str(work / "cache"), "PYTHONPYCACHEPREFIX": str(work / "pycache")}


def run_vmdelta(pairs: list[tuple[str, Path, Path]], work: Path, extra: list[str]) -> list[Result]:
    """vmdelta in the file form and in the stream form (``create -o -``, ``apply -``)."""
    env = vmdelta_env(work)
    overlay, stream, cold = work / "vm.overlay", work / "vm.stream", work / "cold.overlay"
    create = [*VMDELTA, "create", "-q", "-o", str(overlay), *extra]
    create_cold = [*VMDELTA, "create", "-q", "-o", str(cold), *extra]
    create_stream = [*VMDELTA, "create", "-q", "-o", "-", *extra]
    apply = [*VMDELTA, "apply", "-q", str(overlay)]
    apply_stream = [*VMDELTA, "apply", "-q", "-"]
    for kind, base, modified in pairs:
        for argv in (create, create_stream, create_cold):
            argv += [f"--{kind}", str(base), str(modified)]
        apply += [f"--{kind}", str(base), str(work / f"out-{modified.name}")]
        apply_stream += [f"--{kind}", str(base), str(work / f"stream-{modified.name}")]
    # the base index is built once per base and cached: time a create with a warm cache, as a
    # cloudlet holding its base would, after one run that builds it (and fills the bytecode cache)
    if not overlay.exists():
        for kind, base, _ in pairs:  # and keeps a memory base's RAM laid out (vmdelta index --image)
            if kind == "memory":
                measure([*VMDELTA, "index", "-q", "--kind", "memory", "--image", str(base)], env=env)
        measure(create, env=env)
        measure(apply, env=env)
        for _, _, modified in pairs:  # every measured apply writes new files, as zstd's do
            (work / f"out-{modified.name}").unlink()
    c = measure(create, env=env)
    a = measure(apply, env=env)
    cs = measure(create_stream, env=env, stdout=stream)
    s = measure(apply_stream, env=env, stdin=stream)
    for _, _, modified in pairs:
        for rebuilt in (work / f"out-{modified.name}", work / f"stream-{modified.name}"):
            if not same(rebuilt, modified):
                raise SystemExit(f"vmdelta rebuilt {modified.name} wrongly")
            rebuilt.unlink()
    # and as a machine that has never seen the bases: an empty cache, each base indexed (and a
    # memory base parsed) by this create itself
    cold_cache = work / "cold-cache"
    shutil.rmtree(cold_cache, ignore_errors=True)
    k = measure(create_cold, env={**env, "VMDELTA_CACHE_DIR": str(cold_cache)})
    shutil.rmtree(cold_cache)
    return [
        Result("vmdelta", overlay.stat().st_size, c.seconds, c.peak_rss, a.seconds, a.peak_rss),
        Result(STREAM_FORM, stream.stat().st_size, cs.seconds, cs.peak_rss, s.seconds, s.peak_rss),
        Result(COLD_INDEX, cold.stat().st_size, k.seconds, k.peak_rss, None, None),
    ]


SIZE_MODE = "vmdelta --level max (size mode)"


def run_vmdelta_size_mode(pairs: list[tuple[str, Path, Path]], work: Path, extra: list[str]) -> Result:
    """vmdelta's size mode (``create --level max``), file form. It indexes the bases for its
    prefixes at every create, so its time holds that; the unit index is cached as for the rest."""
    env = vmdelta_env(work)
    overlay = work / "max.overlay"
    create = [*VMDELTA, "create", "-q", "-o", str(overlay), "--level", "max", *extra]
    apply = [*VMDELTA, "apply", "-q", str(overlay)]
    for kind, base, modified in pairs:
        create += [f"--{kind}", str(base), str(modified)]
        apply += [f"--{kind}", str(base), str(work / f"max-{modified.name}")]
    c = measure(create, env=env)
    a = measure(apply, env=env)
    for _, _, modified in pairs:
        rebuilt = work / f"max-{modified.name}"
        if not same(rebuilt, modified):
            raise SystemExit(f"vmdelta --level max rebuilt {modified.name} wrongly")
        rebuilt.unlink()
    return Result(SIZE_MODE, overlay.stat().st_size, c.seconds, c.peak_rss, a.seconds, a.peak_rss)


def run_zstd(
    level: int, pairs: list[tuple[str, Path, Path]], work: Path, threads: int = 1, flushed: bool = False
) -> list[Result]:
    """zstd at ``level`` over each pair; with ``flushed``, a second row whose apply also waits for
    its outputs to reach the disk (``fsync``, timed here), as ``vmdelta apply`` does before it
    names an output: the same durability, to compare with."""
    size = 0
    option = [f"-T{threads}"] if threads > 1 else []
    create = apply = flush = 0.0
    c_rss = a_rss = 0
    for _, base, modified in pairs:
        patch, out = work / f"{modified.name}.zst{level}", work / f"{modified.name}.zst{level}.out"
        c = measure(
            [
                "zstd",
                f"-{level}",
                *option,
                "--long=31",
                "-q",
                "-f",
                f"--patch-from={base}",
                str(modified),
                "-o",
                str(patch),
            ]
        )
        a = measure(["zstd", "-d", "--long=31", "-q", "-f", f"--patch-from={base}", str(patch), "-o", str(out)])
        if flushed:
            started = time.perf_counter()
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            flush += time.perf_counter() - started
        if not same(out, modified):
            raise SystemExit(f"zstd rebuilt {modified.name} wrongly")
        size += patch.stat().st_size
        create += c.seconds
        apply += a.seconds
        c_rss, a_rss = max(c_rss, c.peak_rss), max(a_rss, a.peak_rss)
        out.unlink()
    name = " ".join([f"zstd -{level}", *option, "--long=31 --patch-from"])
    results = [Result(name, size, create, c_rss, apply, a_rss)]
    if flushed:
        results.append(Result(f"{name}, -d then fsync", size, create, c_rss, apply + flush, a_rss))
    return results


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


def median_of(rounds: list[Result]) -> Result:
    """One tool's rounds as one result: median times, largest peak RSS (sizes do not vary)."""
    return Result(
        rounds[0].tool,
        rounds[0].size,
        statistics.median(r.create for r in rounds),
        max(r.create_rss for r in rounds),
        None if rounds[0].apply is None else statistics.median(r.apply or 0.0 for r in rounds),
        None if rounds[0].apply_rss is None else max(r.apply_rss or 0 for r in rounds),
    )


def run_case(
    pairs: list[tuple[str, Path, Path]],
    work: Path,
    extra: list[str],
    skip: set[str],
    runs: int,
    size_mode: bool = False,
) -> list[Result]:
    """Every tool ``runs`` times, taking turns; each tool's median."""
    rounds = []
    for _ in range(runs):
        results = run_vmdelta(pairs, work, extra)
        if size_mode:
            results.append(run_vmdelta_size_mode(pairs, work, extra))
        if "zstd-3" not in skip:
            results += run_zstd(3, pairs, work, threads=2, flushed=True)
        if "zstd-19" not in skip:
            results += run_zstd(19, pairs, work)
        if "xdelta3" not in skip:
            results.append(run_xdelta3(pairs, work))
        rounds.append(results)
    return [median_of(list(tool)) for tool in zip(*rounds, strict=True)]


def startup(work: Path, runs: int) -> str:
    """Start-up, median of ``runs`` taking turns: ``vmdelta --help``, and ``vmdelta apply`` up to
    its first work (opening its overlay, missing here: exit status 2), against a bare Python and
    a Python importing numpy, attrs and construct (what reading any overlay needs)."""
    env = vmdelta_env(work)
    commands = {
        "python -c pass (the floor)": ([sys.executable, "-c", "pass"], 0),
        "python -c 'import numpy, attrs, construct' (the libraries' floor)": (
            [sys.executable, "-c", "import numpy, attrs, construct"],
            0,
        ),
        "vmdelta --help": ([*VMDELTA, "--help"], 0),
        "vmdelta apply, to its first work": (
            [*VMDELTA, "apply", "-q", str(work / "none.overlay"), "--disk", str(work / "none.img"), str(work / "o")],
            2,
        ),
    }
    for argv, ok in commands.values():  # fills the bytecode cache
        measure(argv, env=env, ok=ok)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, (argv, ok) in commands.items():
            times[name].append(measure(argv, env=env, ok=ok).seconds)
    floor = statistics.median(times["python -c pass (the floor)"])
    lines = ["### start-up", "", "| command | wall s (median) | × bare Python |", "|---|---:|---:|"]
    for name, seconds in times.items():
        median = statistics.median(seconds)
        lines.append(f"| {name} | {median:.3f} | {median / floor:.1f} |")
    return "\n".join(lines) + "\n"


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
    return "\n".join(lines) + "\n" + size_mode_line(results)


def size_mode_line(results: list[Result]) -> str:
    """The size mode against its targets: its size over the smallest of ``zstd -19`` and
    ``xdelta3``, over ``zstd -19`` alone, and its create time over ``zstd -19``'s (same run)."""
    by_tool = {r.tool.split(" --long")[0]: r for r in results}
    mode, zstd19, xdelta = by_tool.get(SIZE_MODE), by_tool.get("zstd -19"), by_tool.get("xdelta3 -9 -B")
    if mode is None or zstd19 is None:
        return ""
    smallest = min(r.size for r in (zstd19, xdelta) if r is not None)
    return (
        f"\nsize mode: {mode.size / smallest:.3f}x the smallest of zstd -19 / xdelta3, "
        f"{mode.size / zstd19.size:.3f}x zstd -19's size, in {mode.create / zstd19.create:.2f}x its create time "
        f"({mode.create:.2f} s against {zstd19.create:.2f} s); apply {mode.apply or 0:.2f} s\n"
    )


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
    parser.add_argument("--runs", type=int, default=3, help="rounds of every tool; tables give medians (default 3)")
    parser.add_argument(
        "--size-mode", action="store_true", help="also run vmdelta's size mode (create --level max) as a contender"
    )
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
        f"{time.strftime('%Y-%m-%d %H:%M')}; median of {args.runs} rounds, the tools taking turns. "
        "Ratios are vmdelta ÷ tool: below 1 is better for vmdelta.",
        "",
    ]
    for case in filter(None, args.cases.split(",")):
        pairs = cases(folder)[case]
        with tempfile.TemporaryDirectory(prefix="vmdelta-bench-") as tmp:
            results = run_case(pairs, Path(tmp), extra, skip, args.runs, args.size_mode)
            if "model" not in skip:
                results += run_model(pairs, shared)
        text = table(f"{case}: " + ", ".join(m.name for _, _, m in pairs), results)
        print(text, flush=True)
        report.append(text)
    with tempfile.TemporaryDirectory(prefix="vmdelta-bench-") as tmp:
        text = startup(Path(tmp), max(args.runs, 5))
    print(text, flush=True)
    report.append(text)
    out = ROOT / "bench" / "results" / f"{folder.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print(f"written to {out}")
    print(f"chart written to {write_chart(out)}")


if __name__ == "__main__":
    main()
