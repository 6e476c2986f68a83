"""The ``vmdelta`` command: a thin entry point over :mod:`vmdelta_core.api`.

Every error a user can cause ends in one line on stderr and a non-zero exit status; a traceback
would be a bug (set ``VMDELTA_DEBUG=1`` to see one anyway).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from vmdelta_core.cli.parser import build_parser
from vmdelta_core.errors import VmdeltaError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except VmdeltaError as exc:
        if os.environ.get("VMDELTA_DEBUG"):
            raise
        print(f"vmdelta: error: {exc}", file=sys.stderr)
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
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"vmdelta: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
