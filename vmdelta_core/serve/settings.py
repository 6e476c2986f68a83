"""What ``vmdelta serve`` is asked: where to listen, which bases it holds, where outputs go, the
token, TLS. Read from a TOML file (paths in it relative to it) and overridden by flags.

```toml
listen = "127.0.0.1:7478"
output = "/srv/vms"
token_file = "token"          # or token_env = "VMDELTA_TOKEN" (the default)
timeout = 60                  # seconds a client may send nothing
max_connections = 8
tls_cert = "server.pem"       # both or neither
tls_key = "server.key"

[[bases]]
kind = "memory"
path = "base.mem"
format = "qemu"               # the source; detected when absent
options = {}                  # the source's options
sides = { ram = "base-ram.raw" }

[qemu]                        # optional: start the VM instead of writing its memory to a file
command = ["qemu-system-x86_64", "-m", "2048", "-drive", "file={disk0},format=raw",
           "-name", "{name}", "-incoming", "fd:0"]
```
"""

from __future__ import annotations

import itertools
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmdelta_core.errors import ConfigError
from vmdelta_core.serve.protocol import DEFAULT_PORT

__all__ = [
    "DEFAULT_TOKEN_ENV",
    "QemuLaunch",
    "ServeConfig",
    "ServedBase",
    "load_serve_config",
    "parse_address",
    "read_token",
]

DEFAULT_TOKEN_ENV = "VMDELTA_TOKEN"
_KEYS = {
    "listen",
    "output",
    "token_file",
    "token_env",
    "timeout",
    "max_connections",
    "threads",
    "cache_dir",
    "tls_cert",
    "tls_key",
    "bases",
    "qemu",
}
_BASE_KEYS = {"kind", "path", "format", "options", "sides"}
_QEMU_KEYS = {"command"}
#: a placeholder: ``{name}`` or ``{diskN}``; other braces (QEMU's JSON options) are left alone
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DISK = re.compile(r"disk(0|[1-9][0-9]{0,2})")
#: the ``-incoming`` values that read the migration stream from the process's standard input
_STDIN_INCOMING = ("fd:0", "exec:cat")


@attrs.frozen
class ServedBase:
    """A base image the server holds, as the config names it."""

    kind: str = attrs.field(validator=attrs.validators.in_(("memory", "disk")))
    path: Path = attrs.field(converter=Path)
    format: str | None = None
    options: Mapping[str, Any] = attrs.field(factory=dict)
    sides: Mapping[str, Path] = attrs.field(factory=dict)

    def open_options(self) -> dict[str, Any]:
        """What the source's ``open`` gets: the options and the side files (as apply passes them)."""
        return {**self.options, **{name: str(path) for name, path in self.sides.items()}}


def _placeholders(argument: str) -> list[str]:
    return _PLACEHOLDER.findall(argument)


@attrs.frozen
class QemuLaunch:
    """The process ``serve`` starts for each overlay, its standard input the memory stream:
    ``command`` is an argv template, ``{disk0}``, ``{disk1}``, … standing for the rebuilt disks'
    paths and ``{name}`` for the connection's target name, each replaced within its argument
    (never through a shell)."""

    command: tuple[str, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        if not self.command or not all(isinstance(arg, str) and arg for arg in self.command):
            raise ConfigError("qemu.command must be a non-empty list of non-empty strings")
        for arg in self.command:
            for name in _placeholders(arg):
                if name != "name" and not _DISK.fullmatch(name):
                    raise ConfigError(f"qemu.command: unknown placeholder {{{name}}} (known: {{name}}, {{disk0}}, …)")
        pairs = itertools.pairwise(self.command)
        if not any(flag in ("-incoming", "--incoming") and value in _STDIN_INCOMING for flag, value in pairs):
            raise ConfigError("qemu.command must read the migration stream from standard input: -incoming fd:0")

    @property
    def disks(self) -> int:
        """How many disks the template names (one more than the highest ``{diskN}``)."""
        numbers = [int(n[4:]) for arg in self.command for n in _placeholders(arg) if n != "name"]
        return max(numbers, default=-1) + 1

    def argv(self, name: str, disks: list[Path]) -> list[str]:
        """The command for target ``name`` whose rebuilt disks are ``disks``.

        :raises ConfigError: the template names a disk the overlay does not hold.
        """
        if self.disks > len(disks):
            raise ConfigError(f"qemu.command names {{disk{self.disks - 1}}}; the overlay holds {len(disks)} disk(s)")
        values = {"name": name, **{f"disk{n}": str(path) for n, path in enumerate(disks)}}
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in self.command]


@attrs.frozen
class ServeConfig:
    """Everything ``serve`` needs. The token is never shown (``repr``)."""

    output: Path = attrs.field(converter=Path)
    bases: tuple[ServedBase, ...] = attrs.field(converter=tuple)
    token: str = attrs.field(repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    timeout: float = 60.0
    max_connections: int = 16
    threads: int = attrs.field(factory=lambda: _default_threads())
    cache_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    qemu: QemuLaunch | None = None

    def __attrs_post_init__(self) -> None:
        if not self.token:
            raise ConfigError("serve needs a token (token_file, or the environment variable token_env names)")
        if not self.bases:
            raise ConfigError("serve needs at least one base ([[bases]] in the config, or --memory-base/--disk-base)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate and its key")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        if not 1 <= self.max_connections <= 1024:
            raise ConfigError(f"max_connections must be from 1 to 1024, not {self.max_connections!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be from 0 to 65535, not {self.port}")


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT``."""
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"address {text!r}: no closing ]")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"address {text!r}: expected :PORT after ]")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"address {text!r}: the port is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"address {text!r}: port out of range")
    return host or default_host, number


def read_token(token_file: Path | None, token_env: str | None) -> str:
    """The shared token: the file's content, else the environment variable's, stripped of
    surrounding white space."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"token file {token_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        return token
    name = token_env or DEFAULT_TOKEN_ENV
    token = os.environ.get(name, "").strip()
    if not token:
        raise ConfigError(f"no token: give a token file, or set {name}")
    return token


def _path(value: Any, folder: Path, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a path")
    return folder / Path(value).expanduser()


def _base(data: Any, folder: Path, number: int) -> ServedBase:
    where = f"bases[{number}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    stray = set(data) - _BASE_KEYS
    if stray:
        raise ConfigError(f"{where}: unknown key {sorted(stray)[0]!r}")
    if data.get("kind") not in ("memory", "disk"):
        raise ConfigError(f"{where}: kind must be memory or disk")
    options, sides = data.get("options", {}), data.get("sides", {})
    if not isinstance(options, dict) or not isinstance(sides, dict):
        raise ConfigError(f"{where}: options and sides must be tables")
    fmt = data.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise ConfigError(f"{where}: format must be a source name")
    return ServedBase(
        data["kind"],
        _path(data.get("path"), folder, f"{where}.path"),
        fmt,
        options,
        {str(k): _path(v, folder, f"{where}.sides.{k}") for k, v in sides.items()},
    )


def _qemu(data: Any) -> QemuLaunch | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError("qemu must be a table ([qemu])")
    stray = set(data) - _QEMU_KEYS
    if stray:
        raise ConfigError(f"qemu: unknown key {sorted(stray)[0]!r}")
    command = data.get("command")
    if not isinstance(command, list):
        raise ConfigError("qemu.command must be a list of strings")
    return QemuLaunch(command)


def load_serve_config(path: Path | None, **overrides: Any) -> ServeConfig:
    """The config of ``path`` (optional), each override that is not ``None`` replacing its key:
    ``listen``, ``output``, ``token_file``, ``token_env``, ``timeout``, ``max_connections``,
    ``threads``, ``cache_dir``, ``tls_cert``, ``tls_key``, ``qemu`` and ``bases`` (a list of
    :class:`ServedBase`, added to the file's)."""
    data: dict[str, Any] = {}
    folder = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not TOML ({exc})") from None
        folder = Path(path).resolve().parent
        stray = set(data) - _KEYS
        if stray:
            raise ConfigError(f"{path}: unknown key {sorted(stray)[0]!r}")
    bases = data.get("bases", [])
    if not isinstance(bases, list):
        raise ConfigError("bases must be a list of tables ([[bases]])")
    served = [_base(b, folder, n) for n, b in enumerate(bases)] + list(overrides.pop("bases", None) or [])
    for key in ("output", "token_file", "cache_dir", "tls_cert", "tls_key"):
        if key in data:
            data[key] = _path(data[key], folder, key)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "output" not in data:
        raise ConfigError("serve needs an output folder (output in the config, or --output)")
    host, port = parse_address(str(data.get("listen", f"127.0.0.1:{DEFAULT_PORT}")))
    for key, kind in (("timeout", (int, float)), ("max_connections", int), ("threads", int)):
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], kind)):
            raise ConfigError(f"{key} must be a number")
    token_env = data.get("token_env")
    if token_env is not None and not isinstance(token_env, str):
        raise ConfigError("token_env must be the name of an environment variable")
    extra = {k: data[k] for k in ("timeout", "max_connections", "threads") if k in data}
    return ServeConfig(
        output=Path(data["output"]),
        bases=tuple(served),
        token=read_token(data.get("token_file"), token_env),
        host=host,
        port=port,
        cache_dir=data.get("cache_dir"),
        tls_cert=data.get("tls_cert"),
        tls_key=data.get("tls_key"),
        qemu=data["qemu"] if isinstance(data.get("qemu"), QemuLaunch) else _qemu(data.get("qemu")),
        **extra,
    )


def _default_threads() -> int:
    """Worker threads per connection: one a core, at most 4 (the configs' module is imported only
    here, so that ``vmdelta send``, which reads the address helpers above, does not load it)."""
    from vmdelta_core.config import default_threads

    return min(4, default_threads())
