"""The trim filter's own hook: third-party trace parsers.

QEMU has many block trace events and a deployment may log another one (a different block
driver, a custom backend). A plugin teaches the trim filter a new line format by implementing
this hook with the ordinary ``vmdelta`` marker::

    from vmdelta_core.plugin import hookimpl

    @hookimpl
    def vmdelta_trim_trace_parsers(register):
        register(MyParser())          # any object with .name and .parse_line(line)

and declaring its module under the ``vmdelta`` entry-point group as usual. The trim plugin adds
this spec to the plugin manager through ``vmdelta_addhooks``, so core needs no change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmdelta_core.plugin import hookspec

if TYPE_CHECKING:
    from vmdelta_filter_trim.parsers import TraceParser

__all__ = ["vmdelta_trim_trace_parsers"]

# --------------------------------------------------------------------------------------------
# trace parsers: called each time the trim filter reads a trace
# --------------------------------------------------------------------------------------------


@hookspec
def vmdelta_trim_trace_parsers(register: Callable[[TraceParser], None]) -> None:
    """Register parsers for trace-log lines the trim filter does not know yet.

    :param register: call it once per parser (an object with ``name`` and ``parse_line``).
    """
