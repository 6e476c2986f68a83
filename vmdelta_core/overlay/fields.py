"""Checked access to the JSON objects of untrusted metadata: presence, type and range per field.

Each reader asks for a field as what it must be (an integer in a range, a one-line name, an
object) and gets it, or one :class:`FormatError` naming the field by its path
(``images[0].base.size``).
"""

from __future__ import annotations

import re
from typing import Any

from vmdelta_core.errors import FormatError

__all__ = ["NAME", "Fields"]

#: names the core and plugins chose (components, images, digests): printable, one line, short
NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,255}")

_TYPE_NAMES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class Fields:
    """Checked access to one JSON object of the metadata, at ``where`` (``images[0].base``)."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise FormatError(f"overlay metadata: {where or 'the document'} is {_type_name(value)}, not an object")
        self.value = value
        self.where = where

    def _get(self, key: str, kinds: tuple[type, ...], optional: bool, null: bool) -> Any:
        """The value at ``key``; ``None`` when it may be absent (``optional``) and is, or may be
        null (``null``) and is. Nothing else is ever ``None``, so readers may rely on
        ``get(key, default)`` giving the default's type."""
        if key not in self.value:
            if optional:
                return None
            raise FormatError(f"overlay metadata: {self.where or 'the document'} lacks {key!r}")
        value = self.value[key]
        if null and value is None:
            return None
        # bool is an int to Python, never to this format
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join([*(_TYPE_NAMES[k] for k in kinds), *(["null"] if null else [])])
            raise FormatError(f"overlay metadata: {self.at(key)} is {_type_name(value)}, not {expected}")
        return value

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def integer(self, key: str, low: int, high: int, *, optional: bool = False, null: bool = False) -> Any:
        value = self._get(key, (int,), optional, null)
        if value is not None and not low <= value <= high:
            raise FormatError(f"overlay metadata: {self.at(key)} = {value} is out of range ({low} to {high})")
        return value

    def name(self, key: str, *, optional: bool = False, null: bool = False) -> Any:
        value = self._get(key, (str,), optional, null)
        if value is not None and not NAME.fullmatch(value):
            raise FormatError(f"overlay metadata: {self.at(key)} is not a one-line name of 1 to 255 characters")
        return value

    def text(self, key: str, *, optional: bool = False, null: bool = False) -> Any:
        """Any string (a file name as the user spelt it; shown escaped)."""
        return self._get(key, (str,), optional, null)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self._get(key, (str,), False, False)
        if value not in allowed:
            raise FormatError(f"overlay metadata: {self.at(key)} is {value[:40]!r}, not one of {', '.join(allowed)}")
        return value

    def object(self, key: str, *, optional: bool = False, null: bool = False) -> Any:
        """The object at ``key`` as :class:`Fields`, or ``None`` as :meth:`_get` allows."""
        value = self._get(key, (dict,), optional, null)
        return None if value is None else Fields(value, self.at(key))

    def array(self, key: str, most: int) -> list[Any]:
        value = self._get(key, (list,), False, False)
        if len(value) > most:
            raise FormatError(f"overlay metadata: {self.at(key)} has {len(value)} entries, more than {most}")
        return value

    def names(self) -> list[str]:
        """The object's keys, each a one-line name."""
        for key in self.value:
            if not NAME.fullmatch(key):
                raise FormatError(f"overlay metadata: {self.where} has a key that is not a one-line name")
        return list(self.value)


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")
