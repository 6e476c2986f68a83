#!/usr/bin/env python3
"""The comparison tables of ``bench/run.py`` as one chart: overlay size, create time and apply
time of every tool, one row of panels per case (disk, memory, whole VM).

    python bench/chart.py                                   # bench/REPORT.md -> bench/REPORT.png
    python bench/chart.py bench/results/realistic-128.md    # a run's results, PNG beside them

It reads the Markdown that ``run.py`` writes (``bench/results/<set>.md``, or the copy of its
tables in ``REPORT.md``): every table whose header is run.py's, under its ``### case`` heading.
Needs matplotlib (``tox -e bench`` installs it).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import attrs

BENCH = Path(__file__).resolve().parent
#: the header run.py's ``table`` writes; other tables of a report are left alone
_HEADER = re.compile(r"^\| tool \| overlay bytes \|")
_METRICS = (("size", "overlay MB"), ("create", "create s"), ("apply", "apply s"))


@attrs.frozen
class Row:
    """One tool in one case; ``None`` where the tool has no such step (the overlay model)."""

    tool: str
    size: int
    create: float | None
    apply: float | None


def read_tables(markdown: str) -> dict[str, list[Row]]:
    """Case heading -> its rows, in the order run.py wrote them (vmdelta first)."""
    tables: dict[str, list[Row]] = {}
    case = None
    lines = markdown.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("### "):
            case = line[4:].strip()
        elif _HEADER.match(line) and case is not None:
            columns = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for body in lines[number + 2 :]:
                if not body.startswith("|"):
                    break
                cells = dict(zip(columns, (c.strip() for c in body.strip("|").split("|")), strict=True))
                rows.append(
                    Row(
                        cells["tool"],
                        int(cells["overlay bytes"].replace(",", "")),
                        _seconds(cells["create s"]),
                        _seconds(cells["apply s"]),
                    )
                )
            tables[case] = rows
    return tables


def _seconds(cell: str) -> float | None:
    return None if cell in ("–", "-", "") else float(cell)


def draw(tables: dict[str, list[Row]], output: Path, *, title: str) -> None:
    """One row of three bar panels per case; vmdelta's bar stands out, each bar carries its value."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench/chart.py draws with matplotlib: pip install matplotlib (tox -e bench has it)") from None

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(
        len(tables), len(_METRICS), figsize=(13, 1.2 + 2.1 * len(tables)), squeeze=False, layout="constrained"
    )
    figure.suptitle(title)
    for row_axes, (case, rows) in zip(axes, tables.items(), strict=True):
        for ax, (metric, label) in zip(row_axes, _METRICS, strict=True):
            values = [_value(r, metric) for r in rows][::-1]  # vmdelta on top
            names = [r.tool for r in rows][::-1]
            colours = ["#d62728" if name == "vmdelta" else "#9e9e9e" for name in names]
            bars = ax.barh(range(len(rows)), [v or 0 for v in values], color=colours)
            fmt = "{:.1f}" if metric == "size" else "{:.2f}"
            ax.bar_label(bars, ["n/a" if v is None else fmt.format(v) for v in values], padding=3, fontsize=8)
            ax.set_xlim(0, max(v for v in values if v is not None) * 1.25)
            ax.set_yticks(range(len(rows)), names if metric == "size" else [""] * len(rows))
            ax.set_title(f"{case}: {label}" if metric == "size" else label, fontsize=9, loc="left")
            ax.tick_params(labelsize=8)
            ax.spines[["top", "right"]].set_visible(False)
    figure.savefig(output, dpi=100)
    pyplot.close(figure)


def _value(row: Row, metric: str) -> float | None:
    if metric == "size":
        return row.size / 1e6
    return row.create if metric == "create" else row.apply


def write_chart(results: Path, output: Path | None = None) -> Path:
    """Chart ``results`` (run.py's Markdown) into ``output`` (default: beside it, ``.png``)."""
    tables = read_tables(results.read_text())
    if not tables:
        raise SystemExit(f"{results}: no table of bench/run.py in it")
    output = output or results.with_suffix(".png")
    heading = next((line[2:] for line in results.read_text().splitlines() if line.startswith("# ")), results.name)
    draw(tables, output, title=f"{heading} (shorter is better; n/a: the tool has no such step)")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=BENCH / "REPORT.md", help="run.py's Markdown")
    parser.add_argument("-o", "--output", type=Path, help="the PNG (default: beside RESULTS)")
    args = parser.parse_args()
    print(f"written to {write_chart(args.results, args.output)}")


if __name__ == "__main__":
    main()
