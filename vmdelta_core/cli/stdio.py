"""Standard input and output as the binary streams commands read overlays from and write them to."""

from __future__ import annotations

import sys
from typing import BinaryIO

from vmdelta_core.errors import ConfigError

__all__ = ["binary_stdin", "binary_stdout"]


def binary_stdout(what: str) -> BinaryIO:
    """Standard output for ``what``, which is binary: never a terminal."""
    if sys.stdout.isatty():
        raise ConfigError(f"refusing to write {what} to a terminal: redirect standard output or pipe it")
    sys.stdout.flush()
    return sys.stdout.buffer


def binary_stdin(what: str) -> BinaryIO:
    """Standard input for ``what``, unbuffered: a thread reading ahead of apply may still wait in
    a read when the command ends (an error found before the stream's end), and a buffered reader
    it holds would abort the interpreter's exit."""
    if sys.stdin.isatty():
        raise ConfigError(f"{what} is read from standard input, which is a terminal: pipe or redirect it")
    return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
