"""The command line: subcommands, their flags and the help that teaches them."""

from __future__ import annotations

import argparse
import gc
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vmdelta_core.cli.batch import add_batch_parser
from vmdelta_core.cli.handoff import add_handoff_parsers
from vmdelta_core.cli.interop import add_parsers as add_interop_parsers
from vmdelta_core.errors import VmdeltaError
from vmdelta_core.limits import DEFAULT_CODEC, DEFAULT_FRAME, MAX_THREADS, MAX_UNIT

if TYPE_CHECKING:
    from vmdelta_core.registry import Registry

#: the codec a pipeline gets when it names none, whichever way it is built

__all__ = ["build_parser"]

_DESCRIPTION = """\
Compute VM overlays: the compact difference between a base VM (memory snapshot and disk images)
and a customized VM, and rebuild the customized VM from base + overlay, byte for byte.

Images are always given as pairs, the same way in both directions:

  vmdelta create -o vm.overlay --memory base.mem modified.mem --disk base.img modified.img
  vmdelta apply  vm.overlay    --memory base.mem rebuilt.mem  --disk base.img rebuilt.img

Try `vmdelta demo` for a complete round trip on a small real sample."""


class _StoreOnce(argparse.Action):
    """``store`` that refuses a second occurrence: with plain ``store`` the last one wins and
    the first is dropped without a word (``--memory a b --memory c d``, ``--level 3 --level 19``)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen: dict[str, Any] = namespace.__dict__.setdefault("_given", {})
        if self.dest in seen and option_string is not None:
            raise argparse.ArgumentError(
                self, f"given twice ({_shown(seen[self.dest])}, then {_shown(values)}); give it once"
            )
        seen[self.dest] = values
        setattr(namespace, self.dest, values)


def _shown(values: Any) -> str:
    return " ".join(map(str, values)) if isinstance(values, list) else str(values)


def _command(name: str, module: str = "commands") -> Callable[[argparse.Namespace], int]:
    """The handler of subcommand ``name``, imported from ``vmdelta_core.cli.<module>`` when it
    runs (so that ``--help`` and the other commands do not load what it needs)."""

    def run(args: argparse.Namespace) -> int:
        commands = importlib.import_module(f"vmdelta_core.cli.{module}")
        # what start-up made (modules, classes) lives as long as the command: the collector's
        # full passes, which allocating units would trigger, then skip it (0.06 s of a create)
        gc.freeze()
        return int(getattr(commands, name)(args) or 0)

    run.__name__ = name
    return run


class _Version(argparse.Action):
    """``--version``, its distribution read only when asked."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        from vmdelta_core.plugins import core_version

        print(f"{parser.prog} {core_version()}")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """Every ``store`` option of every subcommand (they are made by this class too) is
    :class:`_StoreOnce`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def format_help(self) -> str:
        for action in self._actions:
            if isinstance(action.help, _Later):
                action.help = action.help.text()
        return super().format_help()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        parsed.__dict__.pop("_given", None)
        return parsed, extras


class _Later:
    """Help text made only when help is shown: it names what is installed here, and finding that
    out loads every plugin, which a command that prints no help should not pay for."""

    def __init__(self, make: Callable[[Registry], str]) -> None:
        self._make = make

    def text(self) -> str:
        from vmdelta_core.registry import default_registry

        try:
            return self._make(default_registry()).replace("%", "%%")
        except VmdeltaError as exc:  # help is still shown when a plugin is broken, with why
            return f"(the installed components cannot be listed: {exc})"


def _encoder_help(registry: Registry) -> str:
    defaults = registry.default_encoders()
    policy = "best" if len(defaults) > 1 else "fixed"
    return (
        f"encoders to choose from, in order (default here: {','.join(defaults)} with --policy {policy}: "
        "every installed encoder that declares a default priority, then raw); see `vmdelta plugins`"
    )


def _codec_help(registry: Registry) -> str:
    return f"frame codec (default {DEFAULT_CODEC}); installed: " + "; ".join(
        f"{name} {_levels(registry.codec(name))}" for name in registry.names("codec")
    )


def _levels(codec: Any) -> str:
    bounds, default = getattr(codec, "level_range", None), getattr(codec, "default_level", None)
    if bounds is None:
        return "(no levels)"
    return f"(levels {bounds[0]} to {bounds[1]}" + (f", default {default})" if default is not None else ")")


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {text!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_THREADS}, got {value}")
    return value


def _level(text: str) -> int | str:
    if text == "max":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or max, got {text!r}") from None


def _unit_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in bytes, got {text!r}") from None
    if not 512 <= value <= MAX_UNIT or value % 512:
        raise argparse.ArgumentTypeError(f"must be a multiple of 512 from 512 to {MAX_UNIT}, got {value}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no report")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--threads", type=_threads, metavar="N", help="worker threads (default: one per core)")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where base indexes are cached (default: $VMDELTA_CACHE_DIR or ~/.cache/vmdelta)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmdelta", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser(
        "create",
        help="create an overlay from base/modified pairs",
        description="Create an overlay holding what it takes to turn each base into its modified "
        "counterpart. The overlay file appears only when everything succeeded. With -o - the "
        "overlay goes to standard output in the stream form, frame by frame as it is made "
        "(the report then goes to standard error): `vmdelta create -o - ... | vmdelta apply - ...`.",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OVERLAY", help="overlay file to write; - for standard output"
    )
    p.add_argument("--memory", nargs=2, metavar=("BASE", "MODIFIED"), help="memory snapshot pair (one per VM)")
    p.add_argument(
        "--disk",
        nargs=2,
        action="append",
        default=[],
        metavar=("BASE", "MODIFIED"),
        help="disk image pair; repeat for several disks (their order is kept)",
    )
    p.add_argument(
        "--memory-ram",
        nargs=2,
        metavar=("BASE_RAM", "MODIFIED_RAM"),
        help="raw RAM files of an x-ignore-shared snapshot (the stream holds device state only); "
        "short for --memory-side ram BASE_RAM MODIFIED_RAM",
    )
    p.add_argument(
        "--memory-side",
        nargs=3,
        action="append",
        metavar=("NAME", "BASE_FILE", "MODIFIED_FILE"),
        help="a side file the memory source reads beside each artifact (`vmdelta plugins` lists them)",
    )
    p.add_argument("--memory-format", metavar="NAME", help="source of the memory artifacts (default: detected)")
    p.add_argument("--disk-format", metavar="NAME", help="source of the disk artifacts (default: detected)")
    p.add_argument(
        "--encoder",
        metavar="NAME[,NAME...]",
        help=_Later(_encoder_help),
    )
    p.add_argument(
        "--policy",
        choices=("fixed", "first-smaller", "best"),
        help="how to choose among encoders: fixed = the first; first-smaller = the first whose "
        "payload is smaller than the unit; best = the smallest after compression",
    )
    p.add_argument(
        "--encoder-option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="an encoder's option, e.g. xdelta3.level=9 (see each plugin's README)",
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="NAME[:INPUT]",
        help="drop changed units the guest does not use, e.g. trim:trace.log, xray, freepfn:pfns.txt",
    )
    p.add_argument(
        "--filter-option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="a filter's option, e.g. xray.journal=ignore (see each plugin's README)",
    )
    p.add_argument("--codec", default=DEFAULT_CODEC, metavar="NAME", help=_Later(_codec_help))
    p.add_argument(
        "--level",
        type=_level,
        help="codec level, within the range --codec lists (default: the codec's own); max = the smallest "
        "overlay: with zstd, each frame compressed against the base bytes its units resemble (zstd-base, "
        "level 19, raw units, 16 MiB frames), slower to make",
    )
    p.add_argument("--unit-size", type=_unit_size, default=4096, metavar="BYTES", help="unit size (default 4096)")
    p.add_argument(
        "--frame-size",
        type=int,
        default=DEFAULT_FRAME,
        metavar="BYTES",
        help=f"uncompressed bytes per frame (default {DEFAULT_FRAME >> 20} MiB); a receiver decodes each frame "
        "once it has arrived whole",
    )
    _common(p)
    p.set_defaults(handler=_command("create"))

    p = sub.add_parser(
        "apply",
        help="rebuild the modified VM from its bases and an overlay",
        description="Rebuild each image of OVERLAY from its base. Every base is checked against the "
        "overlay before anything is written; every output is verified against the digest recorded "
        "at create time before it replaces a file. OVERLAY - is read from standard input as it arrives, "
        "in the stream form, each image rebuilt while the rest is still coming; the outputs "
        "appear once the whole stream has arrived and checked.",
    )
    p.add_argument("overlay", metavar="OVERLAY", help="the overlay made by `vmdelta create`; - for standard input")
    p.add_argument(
        "--memory",
        nargs=2,
        metavar=("BASE", "OUTPUT"),
        help="memory base and where to write the result; OUTPUT - streams it to standard output as it "
        "is rebuilt (for QEMU's -incoming), its end only once everything is verified; so does an "
        'OUTPUT that is a FIFO, opened once its reader has opened it (-incoming "exec:cat FIFO")',
    )
    p.add_argument(
        "--disk",
        nargs=2,
        action="append",
        default=[],
        metavar=("BASE", "OUTPUT"),
        help="disk base and output; repeat in the order the disks were given to create",
    )
    p.add_argument(
        "--memory-ram",
        nargs=2,
        metavar=("BASE_RAM", "OUTPUT_RAM"),
        help="raw RAM files of an x-ignore-shared snapshot: the base's and where to write the result; "
        "short for --memory-side ram BASE_RAM OUTPUT_RAM",
    )
    p.add_argument(
        "--memory-side",
        nargs=3,
        action="append",
        metavar=("NAME", "BASE_FILE", "OUTPUT_FILE"),
        help="a side file of the memory artifact: the base's, and where the rebuilt one goes",
    )
    p.add_argument(
        "--disk-format",
        metavar="FORMAT",
        help="write disks in this format instead of the input's, e.g. qcow2 (thin, backed by the base)",
    )
    p.add_argument("--strict", action="store_true", help="refuse an overlay whose filters dropped any unit")
    _common(p)
    p.set_defaults(handler=_command("apply"))

    p = sub.add_parser(
        "inspect", help="describe an overlay", description="Show what an overlay holds and how it was made."
    )
    p.add_argument("overlay", metavar="OVERLAY", help="the overlay to describe (either form); - for standard input")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--frames", action="store_true", help="list every frame too")
    p.add_argument("--no-verify", action="store_true", help="skip the whole-file checksum")
    p.add_argument(
        "--map",
        metavar="PNG",
        help="also draw each image's address space into PNG, a cell per unit: unchanged, zero, "
        "references to the bases or earlier units, each encoder (needs pip install 'vmdelta-core[map]')",
    )
    p.set_defaults(handler=_command("inspect"))

    p = sub.add_parser(
        "convert",
        help="rewrite an overlay in the other form (file <-> stream)",
        description="Rewrite OVERLAY in the stream form (prologue first, each frame headed by its "
        "index entry, for pipes and sockets: `vmdelta apply -`) or in the file form (read from its "
        "end, for random access). Frames are copied byte for byte, so converting back gives the "
        "same file. Without --to, the other form of the input.",
    )
    p.add_argument("overlay", metavar="OVERLAY", help="the overlay to convert (either form); - for standard input")
    p.add_argument("output", metavar="OUTPUT", help="where to write it; - for standard output")
    p.add_argument("--to", choices=("stream", "file"), help="the form to write (default: the other one)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(handler=_command("convert"))

    p = sub.add_parser(
        "index",
        help="build (or refresh) the cached index of base images",
        description="Hash every unit of each base once, so later creates and applies start at once.",
    )
    p.add_argument("bases", nargs="+", metavar="BASE", help="base artifacts (memory snapshots or disks) to index")
    p.add_argument("--kind", choices=("memory", "disk"), default="disk", help="what the bases hold (default disk)")
    p.add_argument("--format", metavar="NAME", help="source name (default: detected)")
    p.add_argument("--unit-size", type=_unit_size, default=4096, metavar="BYTES", help="unit size (default 4096)")
    p.add_argument("--beside", action="store_true", help="write BASE.vmdidx beside each base instead of the cache")
    p.add_argument(
        "--image",
        action="store_true",
        help="also keep each base's image as its source lays it out (a QEMU stream's RAM, a qcow2 chain "
        "composed) in the cache, so that creates and applies map it instead of parsing the base again; "
        "it takes the space of the image's data (a raw disk has nothing to keep)",
    )
    _common(p)
    p.set_defaults(handler=_command("index"))

    p = sub.add_parser(
        "plugins",
        help="list installed components",
        description="List every source, filter, encoder and codec, with the distribution that provides it.",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_command("plugins"))

    p = sub.add_parser(
        "run",
        help="run a TOML pipeline",
        description="Create an overlay as a TOML pipeline describes it (schema: schemas/pipeline.schema.json).",
    )
    p.add_argument(
        "pipeline", metavar="PIPELINE.toml", help="the pipeline file; relative paths in it are relative to it"
    )
    _common(p)
    p.set_defaults(handler=_command("run"))

    _serve_parsers(sub)
    add_batch_parser(sub)
    add_handoff_parsers(sub)
    add_interop_parsers(sub)

    p = sub.add_parser(
        "demo",
        help="create and apply an overlay on a small real sample",
        description="Unpack a small real VM sample shipped with vmdelta, create an overlay, "
        "apply it, verify the result byte for byte and print the statistics.",
    )
    p.add_argument("--keep", metavar="DIR", help="keep the sample, overlay and outputs in DIR")
    _common(p)
    p.set_defaults(handler=_command("demo"))
    return parser


def _serve_parsers(sub: Any) -> None:
    """``serve`` and ``send``: overlays over the network (schemas/transport-v1.md)."""
    p = sub.add_parser(
        "serve",
        help="receive overlays over TCP and rebuild their VMs from the bases held here",
        description="Listen for `vmdelta send`: each connection carries one overlay in the stream "
        "form, whose bases are found among those held here by fingerprint before any frame is read; "
        "its images are rebuilt into a folder of the output folder named after the sender's --name "
        "(or a connection id), and appear only once verified. Clients give the shared token; TLS "
        "when a certificate and key are given. Flags override the config file's keys.",
    )
    p.add_argument("--config", metavar="SERVE.toml", help="the server's config (see the README)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:7478)")
    p.add_argument("--output", metavar="DIR", help="where each connection's folder of outputs goes")
    p.add_argument("--memory-base", action="append", default=[], metavar="PATH", help="a memory base to hold")
    p.add_argument("--disk-base", action="append", default=[], metavar="PATH", help="a disk base to hold")
    p.add_argument("--token-file", metavar="FILE", help="file holding the shared token")
    p.add_argument("--token-env", metavar="NAME", help="environment variable holding it (default VMDELTA_TOKEN)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="drop a client silent this long (default 60)")
    p.add_argument("--max-connections", type=int, metavar="N", help="connections served at once (default 16)")
    p.add_argument("--threads", type=_threads, metavar="N", help="worker threads per connection (default 4)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate (chain) for TLS")
    p.add_argument("--tls-key", metavar="PEM", help="its private key")
    p.add_argument("--cache-dir", metavar="DIR", help="where base indexes are cached")
    p.add_argument("-q", "--quiet", action="store_true", help="log refusals and failures only")
    p.set_defaults(handler=_command("serve"))

    p = sub.add_parser(
        "send",
        help="stream an overlay to a `vmdelta serve`",
        description="Send OVERLAY (either form; - for a stream on standard input) to the server at "
        "HOST:PORT, which rebuilds the VM from the bases it holds, and print its answer. The exit "
        "status is the one `vmdelta apply` would have had for the server's error.",
    )
    p.add_argument("overlay", metavar="OVERLAY", help="the overlay to send; - for standard input")
    p.add_argument("address", metavar="HOST:PORT", help="the server")
    p.add_argument("--name", help="the name of the VM: the folder the server writes it to")
    p.add_argument("--token-file", metavar="FILE", help="file holding the shared token (default: $VMDELTA_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="socket timeout (default 60)")
    p.add_argument("--tls", action="store_true", help="TLS, checking the server with the system's authorities")
    p.add_argument("--tls-ca", metavar="PEM", help="TLS, checking the server with this certificate or CA")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    p.set_defaults(handler=_command("send", "send"))
