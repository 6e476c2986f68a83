"""JSON values that go into an overlay and come back out: bounded in depth and in number size.

An overlay's metadata is untrusted when it is read, and a config's options are written into it.
One definition of the bounds serves both sides, so what ``create`` records ``apply`` and
``inspect`` can read back, and no hostile document reaches Python's recursion limit or its limit
on integer digits (both of which would escape as tracebacks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vmdelta_core.errors import FormatError

__all__ = ["MAX_DEPTH", "MAX_INT", "MIN_INT", "decode_object", "find_problem", "path_text"]

#: arrays and objects nested in one document, the document itself included
MAX_DEPTH = 64
#: integers span what 64 bits hold, signed or not (TOML's integers, sizes, checksums)
MIN_INT = -(1 << 63)
MAX_INT = (1 << 64) - 1
_JSON_SCALARS = (str, int, float, bool, type(None))


class _LongNumber(str):
    """An integer literal far past 64 bits, not converted (Python refuses past 4300 digits, and
    converting long ones costs quadratic time): kept as text so that :func:`find_problem` can say
    where it was."""


def _parse_int(text: str) -> int | _LongNumber:
    return int(text) if len(text) <= 40 else _LongNumber(text)


def path_text(path: tuple[str | int, ...], *, slashes: bool = False) -> str:
    """``("images", 0, "size")`` -> ``images[0].size`` (or ``images/0/size``, as JSON Schema
    says it); odd keys quoted, a long path shortened in the middle."""
    if len(path) > 8:
        gap = "/.../" if slashes else "..."
        return path_text(path[:5], slashes=slashes) + gap + path_text(path[-2:], slashes=slashes)
    out = ""
    for part in path:
        if slashes:
            plain = isinstance(part, int) or (part.isprintable() and part and "/" not in part)
            text = str(part) if plain else repr(part[:40])  # a key may hold a line break or a slash
            out += f"/{text}" if out else text
        elif isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part[:40]!r}]"
    return out


def find_problem(
    value: Any, *, max_depth: int = MAX_DEPTH, scalars: tuple[type, ...] | None = _JSON_SCALARS
) -> tuple[tuple[str | int, ...], str] | None:
    """What makes ``value`` unfit to be stored and read back, and where: ``(path, problem)``,
    the problem phrased to follow the path (``"is nested more than 64 levels deep"``).

    Checks, without recursion: nesting up to ``max_depth``, integers in 64 bits, object keys that
    are strings, and (unless ``scalars`` is ``None``) nothing but JSON scalars at the leaves.
    """
    stack: list[tuple[tuple[str | int, ...], Any, int]] = [((), value, 1)]
    while stack:
        path, item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth > max_depth:
                return path, f"is nested more than {max_depth} levels deep"
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return path, f"has a key of type {type(key).__name__}, not a string"
                    stack.append(((*path, key), child, depth + 1))
            else:
                stack.extend(((*path, k), child, depth + 1) for k, child in enumerate(item))
        elif isinstance(item, _LongNumber):
            return path, f"is a number of {len(item.lstrip('-'))} digits"
        elif isinstance(item, int) and not isinstance(item, bool) and not MIN_INT <= item <= MAX_INT:
            return path, "is a number beyond 64 bits"
        elif scalars is not None and not isinstance(item, scalars):
            name = type(item).__name__
            return path, f"is {'an' if name[0] in 'aeiou' else 'a'} {name}, not a string, number, boolean or null"
    return None


def decode_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from untrusted bytes (UTF-8), within the bounds above.

    :param what: names the document in messages (``"vm.overlay: overlay metadata"``).
    :raises FormatError: not UTF-8, not JSON, not an object, or past a bound (naming where).
    """
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_int=_parse_int)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise FormatError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{what} is not a JSON object")
    problem = find_problem(value)
    if problem is not None:
        raise FormatError(f"{what}: {path_text(problem[0]) or 'the document'} {problem[1]}")
    return value
