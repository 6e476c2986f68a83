"""``vmdelta handoff send|receive``: a running QEMU VM moved to a host that holds its base.

The handoff machinery (:mod:`vmdelta_core.handoff`) and QMP are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_handoff_parsers"]

_SEND = """\
The VM's QEMU must have a QMP socket (-qmp unix:PATH,server=on,wait=off). Both hosts hold the
base the VM was made from; pages of RAM found in it (or in the base disk) travel as references,
and so does a page or disk block equal to one this handoff sent recently (the last 32 MiB).
The migration is QEMU's own precopy: its passes, bandwidth estimate and downtime limit work as
they do (--parameter downtime-limit=300). On any failure the migration is cancelled and the VM
goes on running here; once the destination has the whole stream, this VM is paused
(QEMU's postmigrate) and the destination's resumes.

  vmdelta handoff send --qmp /run/vm1.qmp --to cloudlet:7479 --memory-base base.mem --disk-base base.img

Without --move-disk the guest's disk must be reachable from the destination's QEMU as it is
(shared storage). With it, the guest runs from a qcow2 overlay over the base disk and that
overlay moves: a dirty bitmap is started on the drive, the overlay's clusters are read through
QEMU (an NBD export of the drive) and sent while the guest runs, and once QEMU has stopped the
guest the blocks written since are sent again, before the destination may resume.

  vmdelta handoff send --qmp /run/vm1.qmp --to cloudlet:7479 --memory-base base.mem \
      --disk-base base.img --move-disk"""

_RECEIVE = """\
Everything after -- is the destination's QEMU command; it reads the migration stream from its
standard input (-incoming fd:0), and {name} in an argument is replaced by the name the source
gives. The stream's end, from which QEMU resumes the VM, is written only once the whole
stream is proven (its length and digest); a failed handoff stops QEMU and leaves no VM.

  vmdelta handoff receive --listen 0.0.0.0:7479 --memory-base base.mem --disk-base base.img \\
      -- qemu-system-x86_64 -m 2048 -drive file=shared/vm1.qcow2 -incoming fd:0

When the source moves its disk (send --move-disk), --disk names the new qcow2 it is written to,
thin over --disk-base; {disk0} in the command stands for it. The file must not exist; it holds
every block (qemu-img check passes) before QEMU may resume, and a failed handoff removes it.

  vmdelta handoff receive --memory-base base.mem --disk-base base.img --disk vm1.qcow2 \\
      -- qemu-system-x86_64 -m 2048 -drive file={disk0},format=qcow2 -incoming fd:0"""


def add_handoff_parsers(sub: Any) -> None:
    """``handoff send`` and ``handoff receive``, on the parser's subcommands ``sub``."""
    handoff = sub.add_parser(
        "handoff",
        help="move a running QEMU VM to a host that holds its base, sending only what differs",
        description="Live handoff of a running QEMU VM (schemas/handoff-v1.md).",
    )
    sides = handoff.add_subparsers(title="sides", metavar="SIDE")
    p = sides.add_parser(
        "send",
        help="migrate the VM behind a QMP socket to a `vmdelta handoff receive`",
        description="Migrate a running VM to a destination holding its base.",
        epilog=_SEND,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the running VM's QMP unix socket")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the destination's `handoff receive`")
    _bases(p)
    p.add_argument("--name", help="the VM's name ({name} in the destination's command)")
    p.add_argument(
        "--move-disk",
        action="store_true",
        help="send the guest's disk too: its qcow2 overlay over --disk-base (default: shared storage)",
    )
    p.add_argument("--drive", metavar="ID", help="the drive that moves (default: the VM's only qcow2 drive)")
    p.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="NAME=on|off",
        help="a QEMU migration capability (migrate-set-capabilities); the relay carries plain precopy",
    )
    p.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a QEMU migration parameter (migrate-set-parameters), e.g. downtime-limit=300",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(handler=_send)

    p = sides.add_parser(
        "receive",
        help="receive one handoff and resume its VM in QEMU",
        description="Wait for one `vmdelta handoff send`, check its bases, and feed QEMU the migration stream.",
        epilog=_RECEIVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", default="127.0.0.1:7479", metavar="HOST:PORT", help="default 127.0.0.1:7479")
    _bases(p)
    p.add_argument("--wait", type=float, metavar="SECONDS", help="give up when no source came in this time")
    p.add_argument("--disk", metavar="FILE", help="the new qcow2 a moved disk is written to ({disk0} in the command)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("qemu", nargs=argparse.REMAINDER, metavar="-- QEMU ...", help="the VM's command")
    p.set_defaults(handler=_receive)


def _bases(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-base", required=True, metavar="BASE", help="the base memory snapshot both hosts hold")
    p.add_argument("--disk-base", metavar="BASE", help="the base disk both hosts hold (pages found there go as refs)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the shared token (default: $VMDELTA_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="network timeout (default 60)")
    p.add_argument("--cache-dir", metavar="DIR", help="where base indexes are cached")


def _specs(args: argparse.Namespace) -> tuple[Any, ...]:
    from vmdelta_core.handoff.session import BaseSpec

    specs = [BaseSpec("memory", Path(args.memory_base))]
    if args.disk_base:
        specs.append(BaseSpec("disk", Path(args.disk_base)))
    return tuple(specs)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    from vmdelta_core.errors import ConfigError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"{what} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _value(text: str) -> Any:
    """A QMP parameter's value: a number when it reads as one, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _send(args: argparse.Namespace) -> int:
    from vmdelta_core.errors import ConfigError
    from vmdelta_core.handoff.source import SendConfig, hand_off
    from vmdelta_core.serve.settings import parse_address, read_token

    host, port = parse_address(args.to)
    capabilities = {}
    for name, state in _pairs(args.capability, "--capability").items():
        if state not in ("on", "off"):
            raise ConfigError(f"--capability {name}={state}: on or off")
        capabilities[name] = state == "on"
    config = SendConfig(
        qmp=Path(args.qmp),
        host=host,
        port=port,
        token=read_token(Path(args.token_file) if args.token_file else None, None),
        bases=_specs(args),
        name=args.name,
        capabilities=capabilities,
        parameters={name: _value(v) for name, v in _pairs(args.parameter, "--parameter").items()},
        timeout=args.timeout,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        move_disk=args.move_disk,
        drive=args.drive,
    )
    if args.move_disk and not args.disk_base:
        raise ConfigError("--move-disk sends the disk against its base: give --disk-base")

    def progress(stats: Any, qemu: Any) -> None:
        if args.quiet or args.json:
            return
        if not qemu:  # the disk's first pass, before the migration
            first = stats.disk_passes[-1] if stats.disk_passes else None
            blocks, sent = (first.blocks, first.sent) if first else (0, 0)
            print(
                f"\rdisk: {blocks} blocks of the overlay, {sent >> 20} MiB sent   ", end="", file=sys.stderr, flush=True
            )
            return
        remaining = qemu.get("remaining")
        left = f", {remaining >> 20} MiB left" if isinstance(remaining, int) else ""
        rate = qemu.get("dirty_pages_rate")
        dirty = f", {rate} pages dirtied a second" if isinstance(rate, int) else ""
        passes = stats.disk_passes
        disk = f", {len(passes)} disk passes of {sum(p.blocks for p in passes)} blocks" if passes else ""
        print(
            f"\rpass {qemu.get('dirty_syncs') or 1}: {stats.stream_bytes >> 20} MiB of QEMU's stream, "
            f"{stats.sent_bytes >> 20} MiB sent{left}{dirty}{disk}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    report = hand_off(config, on_progress=progress)
    if not (args.quiet or args.json):
        print(file=sys.stderr)
    data = report.as_json()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif not args.quiet:
        relay = data["relay"]
        print(
            f"handed off in {data['seconds']:.2f} s (QEMU's downtime {data['downtime_ms']} ms): "
            f"{relay['stream_bytes']} bytes of QEMU's stream in {relay['passes']} passes sent as "
            f"{relay['sent_bytes']} bytes; pages {relay['pages']}"
        )
        if relay["disk_passes"]:
            print(_disk_summary(relay))
    return 0


def _disk_summary(relay: dict[str, Any]) -> str:
    """The moved disk in a line: its first pass, the passes while memory moved, the last."""
    first, *later = relay["disk_passes"]
    text = f"disk: {first['blocks']} blocks of the overlay ({first['bytes']} bytes) sent as {first['sent']} bytes"
    if later:
        *running, last = later
        text += (
            f"; {sum(p['blocks'] for p in running)} blocks written meanwhile in {len(running)} passes "
            f"sent as {sum(p['sent'] for p in running)} bytes; {last['blocks']} once the guest stopped"
            f" sent as {last['sent']} bytes"
        )
    return f"{text}; blocks {relay['disk_blocks']}"


def _receive(args: argparse.Namespace) -> int:
    from vmdelta_core.errors import ConfigError
    from vmdelta_core.handoff.session import HandoffReceiver, ReceiveConfig
    from vmdelta_core.registry import default_registry
    from vmdelta_core.serve.settings import QemuLaunch, parse_address, read_token

    command = args.qemu[1:] if args.qemu[:1] == ["--"] else args.qemu
    if not command:
        raise ConfigError("give the VM's command after --, reading the stream with -incoming fd:0")
    host, port = parse_address(args.listen)
    config = ReceiveConfig(
        host=host,
        port=port,
        token=read_token(Path(args.token_file) if args.token_file else None, None),
        bases=_specs(args),
        qemu=QemuLaunch(command),
        timeout=args.timeout,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        disk=Path(args.disk) if args.disk else None,
    )
    with HandoffReceiver(config, default_registry()) as receiver:
        if not args.quiet and not args.json:
            print(f"waiting for a handoff on {receiver.address[0]}:{receiver.address[1]}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.wait if args.wait else None
        answer = receiver.serve_one(deadline, None if args.quiet or args.json else _told)
        if not args.quiet and not args.json:
            print(file=sys.stderr)
    if args.json:
        print(json.dumps(answer, sort_keys=True))
    elif not args.quiet:
        print(
            f"received {answer['stream_bytes']} bytes of stream ({answer['received']} on the wire); "
            f"VM {answer['vm']['pid']}"
            + (f"; disk {answer['disk']['path']} ({answer['disk']['blocks']} blocks)" if "disk" in answer else "")
        )
    return 0


def _told(now: dict[str, int]) -> None:
    """The receiving side's progress line."""
    print(
        f"\r{now['received'] >> 20} MiB received, {now['stream_bytes'] >> 20} MiB of QEMU's stream written, "
        f"{now['disk_blocks']} disk blocks written   ",
        end="",
        file=sys.stderr,
        flush=True,
    )
