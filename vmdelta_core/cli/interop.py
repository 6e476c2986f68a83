"""``vmdelta export`` and ``vmdelta import``: overlays to and from the original VM-synthesis
system's overlay package (``docs/elijah.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vmdelta_core.limits import ELIJAH_BLOB_SIZE as DEFAULT_BLOB_SIZE
from vmdelta_core.limits import ELIJAH_LEVEL as DEFAULT_LEVEL

__all__ = ["add_parsers", "export", "import_"]


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def add_parsers(sub: Any) -> None:
    """The two subcommands, on the parser's ``add_subparsers`` object."""
    p = sub.add_parser(
        "export",
        help="write an overlay in another system's format (--elijah: the original overlay package)",
        description="Write OVERLAY as the overlay package of the original VM-synthesis system "
        "(elijah-provisioning): a zip holding overlay-meta (msgpack) and overlay-blob_N members "
        "(xz-compressed DeltaItems). The package describes one memory snapshot and one raw disk, "
        "as plain files in 4096-byte chunks: create the overlay with --memory-format file. Items "
        "of encoders the package lacks are decoded against their base and stored RAW "
        "(give --base-memory for memory items). See docs/elijah.md.",
    )
    p.add_argument("overlay", metavar="OVERLAY", help="the vmdelta overlay to export")
    p.add_argument("--elijah", required=True, metavar="PACKAGE.zip", help="the package to write")
    p.add_argument(
        "--base-disk",
        required=True,
        metavar="BASE",
        help="the base disk: the package names its base VM by this file's SHA-256",
    )
    p.add_argument(
        "--base-memory",
        metavar="BASE",
        help="the base memory snapshot; needed only to store items of other encoders RAW",
    )
    p.add_argument(
        "--level",
        type=int,
        default=DEFAULT_LEVEL,
        metavar="N",
        help=f"xz preset of the blobs, 0 to 9 (default {DEFAULT_LEVEL}, as the original)",
    )
    p.add_argument(
        "--blob-size",
        type=_positive,
        default=DEFAULT_BLOB_SIZE,
        metavar="BYTES",
        help=f"item bytes per blob before compression (default {DEFAULT_BLOB_SIZE}); "
        "a smaller blob is fetched sooner on demand",
    )
    _common(p)
    p.set_defaults(handler=export)

    p = sub.add_parser(
        "import",
        help="read another system's overlay (the original overlay package) into a vmdelta overlay",
        description="Turn PACKAGE, an overlay package of the original VM-synthesis system, into the "
        "vmdelta overlay -o OVERLAY. The package is checked field by field as it is read and "
        "rebuilt against the bases, so the overlay records the digests `vmdelta apply` verifies: "
        "vmdelta apply OVERLAY --memory BASE_MEMORY OUT.mem --disk BASE_DISK OUT.img. "
        "See docs/elijah.md.",
    )
    p.add_argument("package", metavar="PACKAGE.zip", help="the package to read")
    p.add_argument("--base-memory", required=True, metavar="BASE", help="the base memory snapshot it was made from")
    p.add_argument(
        "--base-disk",
        required=True,
        metavar="BASE",
        help="the base disk it was made from (checked against the package's base VM SHA-256)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OVERLAY", help="the vmdelta overlay to write")
    p.add_argument("--codec", default="zstd", metavar="NAME", help="frame codec of the overlay (default zstd)")
    p.add_argument("--level", type=int, metavar="N", help="codec level (default: the codec's own)")
    _common(p)
    p.set_defaults(handler=import_)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no report")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--threads", type=_positive, metavar="N", help="worker threads (default: one per core)")


def export(args: argparse.Namespace) -> int:
    from vmdelta_core.api import export_elijah
    from vmdelta_core.cli.output import console, print_json, printable, progress_for

    with progress_for(args.quiet or args.json) as progress:
        report = export_elijah(
            Path(args.overlay),
            Path(args.elijah),
            base_disk=Path(args.base_disk),
            base_memory=None if args.base_memory is None else Path(args.base_memory),
            level=args.level,
            blob_size=args.blob_size,
            threads=args.threads,
            progress=progress,
        )
    summary = {
        "output": str(report.output),
        "size": report.size,
        "blobs": report.blobs,
        "items": dict(report.items),
        "converted_to_raw": dict(report.converted),
        "seconds": round(report.seconds, 3),
    }
    if args.json:
        print_json(summary)
    elif not args.quiet:
        items = ", ".join(f"{name} {count}" for name, count in report.items.items())
        converted = ", ".join(f"{name} {count}" for name, count in report.converted.items()) or "none"
        console.print(
            f"wrote {printable(report.output)} ({report.size} bytes, {report.blobs} blobs): items {items}; "
            f"stored RAW for want of their encoder: {converted}",
            highlight=False,
        )
    return 0


def import_(args: argparse.Namespace) -> int:
    from vmdelta_core.api import import_elijah
    from vmdelta_core.cli.output import console, print_json, printable, progress_for

    with progress_for(args.quiet or args.json) as progress:
        report = import_elijah(
            Path(args.package),
            Path(args.output),
            base_memory=Path(args.base_memory),
            base_disk=Path(args.base_disk),
            codec=args.codec,
            level=args.level,
            threads=args.threads,
            progress=progress,
        )
    summary = {
        "output": str(report.output),
        "size": report.size,
        "blobs": report.blobs,
        "items": report.items,
        "self_references_stored_raw": report.self_as_raw,
        "seconds": round(report.seconds, 3),
    }
    if args.json:
        print_json(summary)
    elif not args.quiet:
        items = ", ".join(f"{kind} {count}" for kind, count in report.items.items())
        console.print(
            f"wrote {printable(report.output)} ({report.size} bytes) from {report.blobs} blobs: items {items}; "
            f"self references stored RAW: {sum(report.self_as_raw.values())}",
            highlight=False,
        )
    return 0
