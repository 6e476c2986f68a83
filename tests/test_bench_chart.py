"""bench/chart.py reads run.py's tables as run.py writes them, and REPORT.png is committed beside
the report it draws."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_chart() -> ModuleType:  # bench/ is programs, not a package
    spec = importlib.util.spec_from_file_location("bench_chart", BENCH / "chart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_tables_are_read_case_by_case_with_vmdelta_first() -> None:
    chart = load_chart()
    tables = chart.read_tables((BENCH / "REPORT.md").read_text())
    assert [case.split(":")[0] for case in tables] == ["disk", "memory", "vm"]
    vm = tables["vm: modified.mem, modified.img"]
    assert vm[0] == chart.Row("vmdelta", 8_484_373, 1.29, 1.15)
    model = next(row for row in vm if row.tool == "overlay model, zstd -9")
    assert (model.size, model.apply) == (9_140_873, None)  # the model has no apply step
    assert (BENCH / "REPORT.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_results_file_is_drawn_beside_itself(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (tox -e bench installs it)")
    chart = load_chart()
    results = tmp_path / "realistic-128.md"
    report = (BENCH / "REPORT.md").read_text()
    results.write_text(report[: report.index("## Against the targets")])
    assert chart.write_chart(results) == tmp_path / "realistic-128.png"
    assert (tmp_path / "realistic-128.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
