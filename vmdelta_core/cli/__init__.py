"""The ``vmdelta`` command: a thin entry point over :mod:`vmdelta_core.api`.

Every error a user can cause ends in one line on stderr and a non-zero exit status; a traceback
would be a bug (set ``VMDELTA_DEBUG=1`` to see one anyway).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NoReturn

from vmdelta_core.cli.parser import build_parser
from vmdelta_core.errors import StorageError, VmdeltaError

__all__ = ["main", "run"]


class _Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so that nothing half-written remains."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise _Stopped(signum)


@contextlib.contextmanager
def _stopping_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the command as SIGINT does (outputs discarded, one line, 128+N)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        with _stopping_signals():
            return int(args.handler(args) or 0)
    except _Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        print(f"vmdelta: stopped by {name}; no output was written", file=sys.stderr)
        return 128 + stopped.signum
    except VmdeltaError as exc:
        if os.environ.get("VMDELTA_DEBUG"):
            raise
        from vmdelta_core.cli.output import printable  # names in messages may come from an overlay

        print(f"vmdelta: error: {printable(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (`vmdelta inspect --json | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("vmdelta: interrupted; no output was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("vmdelta: error: out of memory", file=sys.stderr)
        return 1
    except OSError as exc:
        if os.environ.get("VMDELTA_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vmdelta: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return StorageError.exit_code


def run() -> NoReturn:
    """The ``vmdelta`` program: :func:`main`, then an exit that skips tearing the interpreter
    down. Every output is in place and every file closed by then; freeing each object of numpy,
    the plugins and the caches one by one would only make the user wait (a twentieth of a second
    of every command). The exit handlers still run and the standard streams are flushed."""
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
