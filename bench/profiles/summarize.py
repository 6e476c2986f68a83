#!/usr/bin/env python3
"""A short summary of cProfile files of ``vmdelta apply``: the system calls that cost per unit or
per file, and vmdelta's functions by cumulative time, as Markdown.

    python -m cProfile -o apply.prof -m vmdelta_core.cli apply -q OVERLAY --memory ... --disk ...
    python bench/profiles/summarize.py apply.prof [more.prof ...]
"""

from __future__ import annotations

import argparse
import pstats
import re

#: the calls whose count says whether apply works per unit or per run
CALLS = (
    "<built-in method posix.pwrite>",
    "<built-in method posix.pwritev>",
    "<built-in method posix.pread>",
    "<built-in method posix.copy_file_range>",
    "<built-in method posix.fsync>",
    "<built-in method posix.replace>",
    "<method 'read' of '_io.BufferedReader' objects>",
    "<method 'acquire' of '_thread.lock' objects>",
)


def summary(path: str, top: int) -> str:
    stats = pstats.Stats(path)
    by_name: dict[str, tuple[int, float]] = {}
    functions = []
    for (file, _line, name), (_cc, calls, own, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        count, seconds = by_name.get(name, (0, 0.0))
        by_name[name] = (count + calls, seconds + own)
        if "vmdelta" in file and not name.startswith("<"):
            functions.append((cumulative, re.sub(r".*/(vmdelta_[a-z_]+)/", r"\1/", file) + f":{name}"))
    lines = [f"{stats.total_tt:.2f} s under the profiler", "", "| call | calls | own s |", "|---|---:|---:|"]  # type: ignore[attr-defined]
    for name in CALLS:
        if name in by_name:
            count, seconds = by_name[name]
            lines.append(f"| {name.strip('<>')} | {count:,} | {seconds:.3f} |")
    lines += ["", "| vmdelta function | cumulative s |", "|---|---:|"]
    seen = set()
    for cumulative, name in sorted(functions, reverse=True):
        if name not in seen and len(seen) < top:
            seen.add(name)
            lines.append(f"| {name} | {cumulative:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+")
    parser.add_argument("--top", type=int, default=14, help="vmdelta functions listed (default 14)")
    args = parser.parse_args()
    for path in args.profiles:
        print(f"#### {path}\n\n{summary(path, args.top)}")


if __name__ == "__main__":
    main()
