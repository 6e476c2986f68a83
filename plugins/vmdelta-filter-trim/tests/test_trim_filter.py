from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import vmdelta_filter_trim
from trim_helpers import array_context
from vmdelta_filter_trim import DISCARD, TraceEvent, TrimFilter

from vmdelta_core.plugin import ConfigError, FormatError, PluginError, hookimpl
from vmdelta_core.testing import check_filter, default_registry, main, registry_with

MIB = 1 << 20


def nbd(t: str, op: int, offset: int, length: int) -> str:
    return (
        f"77@{t}:nbd_send_request Sending request to server: {{ .from = {offset}, .len = {length}, "
        f".handle = 1, .flags = 0x0, .type = {op} (x) }}\n"
    )


def write_log(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "trace.log"
    path.write_text("".join(lines))
    return path


def select(ctx, candidates) -> np.ndarray:
    return check_filter(TrimFilter(), ctx, np.asarray(candidates, dtype=np.int64)).drop


def test_conformance_and_basic_rule(tmp_path: Path) -> None:
    log = write_log(tmp_path, nbd("10.000001", 1, 0, 8 * 4096), nbd("10.000002", 4, 0, 4 * 4096))
    drop = select(array_context(MIB, log), [0, 1, 3, 4, 5])
    assert drop.tolist() == [True, True, True, False, False]


def test_unit_written_after_its_last_discard_is_kept(tmp_path: Path) -> None:
    log = write_log(
        tmp_path,
        nbd("10.000001", 4, 0, 4 * 4096),  # discard units 0-3
        nbd("10.000002", 1, 4096 + 512, 512),  # then a sector of unit 1 is written
        nbd("10.000003", 4, 2 * 4096, 4096),  # unit 2 discarded again
    )
    assert select(array_context(MIB, log), [0, 1, 2, 3]).tolist() == [True, False, True, True]


def test_discard_after_a_later_line_but_earlier_time_counts_by_time(tmp_path: Path) -> None:
    # lines are out of time order: the write (t=2) came after the discard (t=1) in time
    log = write_log(tmp_path, nbd("10.000002", 1, 0, 4096), nbd("10.000001", 4, 0, 4096))
    assert select(array_context(MIB, log), [0]).tolist() == [False]


def test_partly_covered_units_are_kept(tmp_path: Path) -> None:
    log = write_log(tmp_path, nbd("1.000001", 4, 512, 3 * 4096))
    assert select(array_context(MIB, log), [0, 1, 2, 3]).tolist() == [False, True, True, False]


def test_adjacent_discards_cover_a_unit_together(tmp_path: Path) -> None:
    log = write_log(tmp_path, nbd("1.000001", 4, 0, 2048), nbd("1.000002", 4, 2048, 2048))
    assert select(array_context(MIB, log), [0]).tolist() == [True]


def test_short_last_unit_is_judged_on_its_bytes(tmp_path: Path) -> None:
    size = 3 * 4096 + 1024
    log = write_log(tmp_path, nbd("1.000001", 4, 3 * 4096, 1024))
    assert select(array_context(size, log), [2, 3]).tolist() == [False, True]


def test_window_options_drop_requests_outside_the_snapshots(tmp_path: Path) -> None:
    log = write_log(tmp_path, nbd("5.000000", 4, 0, 4096), nbd("9.000000", 4, 4096, 4096))
    ctx = array_context(MIB, log, after="4.5", before=8_000_000)
    assert select(ctx, [0, 1]).tolist() == [True, False]


def test_a_log_of_another_disk_is_refused(tmp_path: Path) -> None:
    log = write_log(tmp_path, nbd("1.000001", 4, 2 * MIB, 4096))
    with pytest.raises(ConfigError, match="another disk"):
        select(array_context(MIB, log), [0])


def test_a_file_without_trace_lines_is_refused(tmp_path: Path) -> None:
    log = write_log(tmp_path, "hello\nworld\n")
    with pytest.raises(ConfigError, match="no line"):
        select(array_context(MIB, log), [0])


def test_an_unreadable_trace_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        select(array_context(MIB, tmp_path / "absent.log"), [0])


def test_the_core_refuses_trim_without_a_trace_or_on_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kinds`` and ``needs_input`` are checked by the core before ``select``: one line, no overlay."""
    image, out = tmp_path / "image", tmp_path / "vm.overlay"
    image.write_bytes(bytes(MIB))
    log = write_log(tmp_path, nbd("1.000001", 4, 0, 4096))
    assert main(["create", "-q", "-o", str(out), "--disk", str(image), str(image), "--filter", "trim"]) == 2
    assert "'trim' needs an input" in capsys.readouterr().err
    assert main(["create", "-q", "-o", str(out), "--memory", str(image), str(image), "--filter", f"trim:{log}"]) == 2
    assert "'trim'" in capsys.readouterr().err
    assert not out.exists()


def test_damaged_line_names_its_line_number(tmp_path: Path) -> None:
    log = write_log(tmp_path, nbd("1.000001", 4, 0, 4096), "9@1.2:nbd_send_request Sending request to server: {}\n")
    with pytest.raises(FormatError, match="line 2"):
        select(array_context(MIB, log), [0])


def test_details_are_json_counts(tmp_path: Path) -> None:
    import json

    log = write_log(tmp_path, nbd("1.000001", 4, 0, 8192), nbd("1.000002", 0, 0, 512), "noise\n")
    result = TrimFilter().select(array_context(MIB, log), np.array([0, 1, 2], dtype=np.int64))
    details = json.loads(json.dumps(result.details))
    assert result.reason == "trim"
    assert details["discards"] == 1 and details["other"] == 1 and details["unrecognised_lines"] == 1
    assert details["dropped"] == 2 and details["discarded_bytes"] == 8192


class TabParser:
    """A third-party format: ``T_US<TAB>discard|write<TAB>OFFSET<TAB>LENGTH``."""

    name = "tabbed"

    def parse_line(self, line: str) -> TraceEvent | None:
        parts = line.split("\t")
        if len(parts) != 4 or parts[1] not in ("discard", "write"):
            return None
        return TraceEvent(int(parts[0]), parts[1], int(parts[2]), int(parts[3]))


class TabPlugin:
    @hookimpl
    def vmdelta_trim_trace_parsers(self, register) -> None:
        register(TabParser())


def test_third_party_parser_through_the_hook(tmp_path: Path) -> None:
    log = write_log(tmp_path, "100\tdiscard\t0\t8192\n", "200\twrite\t4096\t1\n")
    # the trim plugin adds the hook's spec to the manager (vmdelta_addhooks) and its filter asks
    # the plugins of that manager, whatever order they were registered in
    for plugins in ((vmdelta_filter_trim, TabPlugin()), (TabPlugin(), vmdelta_filter_trim)):
        trim = registry_with(*plugins).filter("trim")
        result = trim.select(array_context(MIB, log), np.array([0, 1], dtype=np.int64))
        assert result.drop.tolist() == [True, False]
        assert result.details["events_by_parser"] == {"tabbed": 2}
    assert DISCARD == "discard"


def test_a_parser_name_registered_twice_is_a_plugin_error(tmp_path: Path) -> None:
    log = write_log(tmp_path, nbd("1.000001", 4, 0, 4096))
    with pytest.raises(PluginError, match="twice"):
        TrimFilter(parsers=[TabParser(), TabParser()]).select(array_context(MIB, log), np.array([0], dtype=np.int64))


def test_registered_through_the_entry_point() -> None:
    assert isinstance(default_registry().filter("trim"), TrimFilter)
