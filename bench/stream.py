#!/usr/bin/env python3
"""Streaming synthesis: the overlay applied while it arrives, against sending it first.

Over a link of a given rate (a token-bucket relay, the same for every contender), from the first
byte sent to every image rebuilt and verified:

* ``file then apply``: the overlay file crosses the link, then ``vmdelta apply`` runs;
* ``zstd then apply``: the same with ``zstd --patch-from`` patches (one per image);
* ``stream``: ``vmdelta apply -`` reads the stream form from the link as it arrives.

It also gives the peak RSS of ``create -o -`` and ``apply -`` on the realistic VM and on the same
VM with its disk grown to 1 GiB of holes, to show memory does not follow the image size.

    python bench/stream.py                     # 25 and 100 Mbit/s
    python bench/stream.py --rates 25
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import measure  # noqa: E402

from vmdelta_core.testing import real_fixtures  # noqa: E402

VMDELTA = [sys.executable, "-m", "vmdelta_core"]


def relay(rate: float) -> None:
    """Copy standard input to standard output at ``rate`` bytes a second (a token bucket)."""
    src, dst = sys.stdin.buffer, sys.stdout.buffer
    started, sent, step = time.perf_counter(), 0, 64 << 10
    while chunk := src.read1(step):
        dst.write(chunk)
        dst.flush()
        sent += len(chunk)
        ahead = sent / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)


def through_link(rate: float, source: Path, target: Path) -> float:
    """Seconds to carry ``source`` to ``target`` over the link."""
    started = time.perf_counter()
    with open(source, "rb") as src, open(target, "wb") as dst:
        subprocess.run([sys.executable, __file__, "--relay", str(rate)], stdin=src, stdout=dst, check=True)
    return time.perf_counter() - started


def pipeline(argv_apply: list[str], overlay: Path, rate: float, env: dict[str, str], out: Path) -> float:
    """Seconds from the first byte of ``overlay`` sent over the link to ``apply -`` done (its
    standard output into ``out``)."""
    started = time.perf_counter()
    with open(overlay, "rb") as src, open(out, "wb") as sink:
        link = subprocess.Popen([sys.executable, __file__, "--relay", str(rate)], stdin=src, stdout=subprocess.PIPE)
        done = subprocess.run(argv_apply, stdin=link.stdout, env=env, stdout=sink, stderr=subprocess.PIPE)
        assert link.stdout is not None
        link.stdout.close()
        link.wait()
    if done.returncode:
        raise SystemExit(f"apply - failed: {done.stderr.decode().strip()}")
    return time.perf_counter() - started


def grown(folder: Path, pairs: list[tuple[str, Path, Path]], size: int) -> list[tuple[str, Path, Path]]:
    """The same pairs with every disk grown to ``size`` bytes of holes."""
    out = []
    for kind, base, modified in pairs:
        if kind == "disk":
            b, m = folder / f"grown-{base.name}", folder / f"grown-{modified.name}"
            for src, dst in ((base, b), (modified, m)):
                subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
                os.truncate(dst, size)
            base, modified = b, m
        out.append((kind, base, modified))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="25,100", help="link rates in Mbit/s")
    parser.add_argument("--relay", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        relay(args.relay)
        return
    found = real_fixtures()
    if found is None:
        raise SystemExit("no realistic fixtures (VMDELTA_FIXTURES)")
    folder = found
    pairs = [
        ("memory", folder / "base.mem", folder / "modified.mem"),
        ("disk", folder / "base.img", folder / "modified.img"),
    ]
    work = Path(tempfile.mkdtemp(prefix="vmdelta-stream-"))
    env = {**os.environ, "VMDELTA_CACHE_DIR": str(work / "cache")}
    try:
        lines = ["| case | peak RSS create -o - | peak RSS apply - |", "|---|---:|---:|"]
        for name, case in (("realistic VM", pairs), ("disk grown to 1 GiB", grown(work, pairs, 1 << 30))):
            create = [*VMDELTA, "create", "-q", "-o", "-"]
            apply = [*VMDELTA, "apply", "-q", "-"]
            for kind, base, modified in case:
                create += [f"--{kind}", str(base), str(modified)]
                apply += [f"--{kind}", str(base), str(work / f"out-{kind}")]
            overlay = work / f"{name[:4]}.vmds"
            measure([*create], env=env)  # index the bases once
            with open(overlay, "wb") as out:
                made = subprocess.run(create, stdout=out, env=env, check=True)
            del made
            c = measure(create, env=env)
            with open(overlay, "rb") as src:
                started = time.perf_counter()
                proc = subprocess.Popen(apply, stdin=src, env=env, stderr=subprocess.PIPE)
                _, status, usage = os.wait4(proc.pid, 0)
                if proc.stderr:
                    proc.stderr.close()
                if os.waitstatus_to_exitcode(status):
                    raise SystemExit(f"apply - of {name} failed")
            lines.append(f"| {name} | {c.peak_rss >> 20} MiB | {usage.ru_maxrss >> 10} MiB |")
        print("\n".join(lines), "\n")

        stream = work / "real.vmds"
        files = work / "vm.vmdo"
        subprocess.run([*VMDELTA, "convert", "-q", str(stream), str(files)], check=True, env=env)
        apply_file = [*VMDELTA, "apply", "-q", str(work / "arrived.vmdo")]
        apply_stream = [*VMDELTA, "apply", "-q", "-"]
        apply_pipe = [*VMDELTA, "apply", "-q", "-"]  # the memory stream to standard output, as QEMU would read it
        for kind, base, _ in pairs:
            apply_file += [f"--{kind}", str(base), str(work / f"file-{kind}")]
            apply_stream += [f"--{kind}", str(base), str(work / f"stream-{kind}")]
            apply_pipe += [f"--{kind}", str(base), "-" if kind == "memory" else str(work / f"pipe-{kind}")]
        patches = []
        for kind, base, modified in pairs:
            patch = work / f"{kind}.zst"
            subprocess.run(
                ["zstd", "-3", "--long=31", "-q", "-f", f"--patch-from={base}", str(modified), "-o", str(patch)],
                check=True,
            )
            patches.append((base, patch))
        lines = [
            "| link | overlay bytes | transfer alone | file then apply | zstd -3 then apply | stream "
            "| stream / transfer | stream, memory to a pipe | pipe / transfer |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for mbit in (float(r) for r in args.rates.split(",")):
            rate = mbit * 1e6 / 8
            transfer = through_link(rate, files, work / "arrived.vmdo")
            then_apply = transfer + measure(apply_file, env=env).seconds
            zstd = 0.0
            for base, patch in patches:
                zstd += through_link(rate, patch, work / "arrived.zst")
                started = time.perf_counter()
                subprocess.run(
                    ["zstd", "-d", "--long=31", "-q", "-f", f"--patch-from={base}", str(work / "arrived.zst"),
                     "-o", str(work / "zstd.out")],
                    check=True,
                )  # fmt: skip
                zstd += time.perf_counter() - started
            streamed = pipeline(apply_stream, stream, rate, env, work / "stdout")
            piped = pipeline(apply_pipe, stream, rate, env, work / "pipe-memory")
            for kind, _, modified in pairs:
                for got in (work / f"stream-{kind}", work / f"pipe-{kind}"):
                    if subprocess.run(["cmp", "-s", str(got), str(modified)]).returncode:
                        raise SystemExit(f"{got.name} differs from the original")
            lines.append(
                f"| {mbit:g} Mbit/s | {stream.stat().st_size} | {transfer:.2f} s | {then_apply:.2f} s | "
                f"{zstd:.2f} s | {streamed:.2f} s | {streamed / transfer:.2f}x | {piped:.2f} s | "
                f"{piped / transfer:.2f}x |"
            )
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
