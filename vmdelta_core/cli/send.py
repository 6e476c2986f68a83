"""``vmdelta send``: an overlay streamed to a ``vmdelta serve``.

It imports only the transport's client and the container's fixed layout, so that a stream-form
overlay's first byte is on the wire about as soon as the interpreter has started.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vmdelta_core.cli.output import console, print_json
from vmdelta_core.cli.stdio import binary_stdin
from vmdelta_core.serve.client import client_tls_context, send_overlay
from vmdelta_core.serve.settings import parse_address, read_token

__all__ = ["send"]


def send(args: argparse.Namespace) -> int:
    host, port = parse_address(args.address)
    token = read_token(Path(args.token_file) if args.token_file else None, None)
    from_stdin = args.overlay == "-"
    tls = client_tls_context(Path(args.tls_ca) if args.tls_ca else None) if (args.tls or args.tls_ca) else None
    answer = send_overlay(
        Path("standard input") if from_stdin else Path(args.overlay),
        host,
        port,
        token=token,
        name=args.name,
        stream=binary_stdin("the overlay") if from_stdin else None,
        timeout=args.timeout,
        tls=tls,
    )
    if args.json:
        print_json(answer)
    elif not args.quiet:
        for output in answer.get("outputs", []):
            console.print(
                f"{output.get('image')}: {answer.get('target')}/{output.get('file')} "
                f"({output.get('size')} bytes, {output.get('digest')})"
            )
        console.print(f"sent to {args.address}: rebuilt as {answer.get('target')} in {answer.get('seconds')} s")
    return 0
