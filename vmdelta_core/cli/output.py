"""What the CLI shows: rich progress bars on a terminal, statistics tables, JSON."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from vmdelta_core.overlay.metadata import OverlayMetadata

__all__ = [
    "BarProgress",
    "MissingComponent",
    "console",
    "err_console",
    "human_size",
    "plugins_table",
    "print_json",
    "printable",
    "progress_for",
    "render_overlay",
]

#: C0 and C1 controls (a terminal's escape sequences) and lone surrogates (undecodable file names,
#: which the terminal's encoding refuses)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(value: Any) -> str:
    """``value`` as text safe to show on a terminal: control characters and lone surrogates
    escaped (``\\x1b``, ``\\udcff``). Names and file names from an overlay are untrusted, and a
    file name need not be valid UTF-8."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", str(value))


class _LazyConsole:
    """rich's console, imported on first use: commands that print nothing start faster.

    Text is printed as it is, never read as rich markup or emoji codes (a file named ``[/x]``
    would be an error, one named ``:x:`` an emoji), and strings are shown :func:`printable`.
    """

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, highlight=False, markup=False, emoji=False)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.get().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


console: Any = _LazyConsole(stderr=False)
_err: Any = _LazyConsole(stderr=True)
#: where reports go when standard output carries an overlay or an artifact
err_console: Any = _err


class BarProgress:
    """Implements :class:`vmdelta_core.records.Progress` with rich bars on stderr."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=_err.get(),
            transient=True,
        )
        self._current: int | None = None

    def start(self, description: str, total: int) -> Callable[[int], None]:
        if self._current is not None:
            self._progress.remove_task(self._current)
        task = self._progress.add_task(description, total=max(total, 1))
        self._current = task
        return lambda n: self._progress.advance(task, n)

    def __enter__(self) -> BarProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


class _Silent:
    def start(self, description: str, total: int) -> Callable[[int], None]:
        return lambda n: None


@contextmanager
def progress_for(quiet: bool) -> Iterator[Any]:
    """Bars on an interactive terminal unless ``-q``; silence otherwise."""
    if quiet or not sys.stderr.isatty():
        yield _Silent()
        return
    with BarProgress() as bars:
        yield bars


def print_json(data: Any, *, stderr: bool = False) -> None:
    (sys.stderr if stderr else sys.stdout).write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def plugins_table(rows: list[dict[str, Any]]) -> Any:
    """The table ``vmdelta plugins`` prints: one row per installed component."""
    from rich.table import Table

    table = Table()
    columns = ("component", "kind", "distribution", "version", "plugin")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row[column]) for column in columns))
    return table


@attrs.frozen
class MissingComponent:
    """A component an overlay needs at apply that this machine lacks, and what gets it."""

    kind: str
    name: str
    distribution: str
    version: str
    remedy: str


def human_size(n: int) -> str:
    """Bytes as people read them: ``512 B``, ``4.8 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _cell(value: Any) -> Text:
    from rich.text import Text

    return Text(printable(value))


def render_overlay(
    meta: OverlayMetadata,
    *,
    size: int | None = None,
    frames: list[dict[str, Any]] | None = None,
    to: Any = None,
    missing: list[MissingComponent] | None = None,
) -> None:
    """The statistics table of an overlay, one column per image (``meta`` is checked metadata:
    :meth:`~vmdelta_core.overlay.metadata.OverlayMetadata.from_json`); with ``missing``, the
    components table says which of them this machine lacks and how to get them."""
    from rich.table import Table

    out = console if to is None else to

    images = meta.images
    title = "overlay" + (f" — {human_size(size)}" if size is not None else "")
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for image in images:
        table.add_column(_cell(f"{image.name} ({image.source})"), justify="right")

    def row(label: str, values: list[Any]) -> None:
        table.add_row(_cell(label), *[_cell(v) for v in values])

    stats = [image.statistics for image in images]
    row("image size", [human_size(image.size) for image in images])
    row("units", [s.units for s in stats])
    row("changed", [s.changed for s in stats])
    for name in sorted({name for s in stats for name in s.dropped}):
        row(f"  dropped by {name}", [s.dropped.get(name, 0) for s in stats])
    row("  zero", [s.zero for s in stats])
    row("  same as base memory", [s.base_memory for s in stats])
    row("  same as base disk", [s.base_disk for s in stats])
    row("  same as earlier unit", [s.earlier for s in stats])
    for name in sorted({name for s in stats for name in s.encoders}):
        uses = [s.encoders.get(name) for s in stats]
        row(f"  {name}", [use.units if use else "-" for use in uses])
        row(
            "    bytes → stored",
            [f"{human_size(use.bytes)} → {human_size(use.stored_bytes or 0)}" if use else "-" for use in uses],
        )
    row("  references, stored", [human_size(s.references_stored_bytes) for s in stats])
    row("stored (compressed)", [human_size(s.stored_bytes) for s in stats])
    out.print(table)
    for image in images:
        for f in image.filters:
            out.print(
                f"{image.name}: filter {f.name} dropped {f.dropped} units ({f.reason}); "
                f"input {f.input or '-'} {f.input_fingerprint or ''}"
            )
    _render_components(meta, out, missing)
    if frames is not None:
        ft = Table(title="frames", title_justify="left")
        for column in ("image", "kind", "items", "addresses", "bytes", "stored"):
            ft.add_column(column, justify="right")
        for f in frames:
            owner = images[f["image"]].name if 0 <= f["image"] < len(images) else f"#{f['image']}"
            ft.add_row(
                *map(
                    _cell,
                    (owner, f["kind"], f["items"], f"{f['first']:#x}-{f['end']:#x}", f["length"], f["stored"]),
                )
            )
        out.print(ft)


def _render_components(meta: OverlayMetadata, out: Any, missing: list[MissingComponent] | None) -> None:
    """The components that made the overlay; with ``missing``, a column saying whether this
    machine has each one, and after the table how to get those apply needs."""
    from rich.table import Table

    lacking = {(m.kind, m.name) for m in missing or ()}
    components = Table(title="components", title_justify="left")
    columns = ("kind", "name", "distribution", "version", "id") + (("here",) if missing is not None else ())
    for column in columns:
        components.add_column(column)
    for c in meta.components:
        ident = f"{c.ref:#x}" if c.kind == "encoder" else str(c.id) if c.kind == "codec" else ""
        here = (_presence(c.kind, (c.kind, c.name) in lacking),) if missing is not None else ()
        components.add_row(*map(_cell, (c.kind, c.name, c.distribution, c.version, ident, *here)))
    out.print(components)
    for m in missing or ():
        out.print(f"apply needs the {m.kind} {m.name!r} ({m.distribution} {m.version}), missing here: {m.remedy}")


def _presence(kind: str, lacking: bool) -> str:
    if kind == "filter":
        return "not needed to apply"  # filters run at create only
    return "MISSING" if lacking else "yes"
