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
```
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmdelta_core.config import default_threads
from vmdelta_core.errors import ConfigError
from vmdelta_core.serve.protocol import DEFAULT_PORT

__all__ = ["DEFAULT_TOKEN_ENV", "ServeConfig", "ServedBase", "load_serve_config", "parse_address", "read_token"]

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
}
_BASE_KEYS = {"kind", "path", "format", "options", "sides"}


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
    threads: int = attrs.field(factory=lambda: min(4, default_threads()))
    cache_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

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


def load_serve_config(path: Path | None, **overrides: Any) -> ServeConfig:
    """The config of ``path`` (optional), each override that is not ``None`` replacing its key:
    ``listen``, ``output``, ``token_file``, ``token_env``, ``timeout``, ``max_connections``,
    ``threads``, ``cache_dir``, ``tls_cert``, ``tls_key`` and ``bases`` (a list of
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
        **extra,
    )
