"""The overlay's metadata block, checked before anything trusts it.

Overlays are untrusted input. Every field ``apply``, ``inspect`` and the CLI's report read is
checked here, once, for presence, type and range, so that what they read afterwards is known to be
there and of the right kind: damage or a hostile file ends in one :class:`FormatError` naming the
field, never in a traceback or an absurd allocation. Fields nothing reads (``settings``,
``creator``, a filter's ``details``) are only held to the bounds of :mod:`vmdelta_core.jsonvalue`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from vmdelta_core.errors import FormatError
from vmdelta_core.jsonvalue import find_problem, path_text
from vmdelta_core.overlay.container import KIND_ITEMS, FrameEntry
from vmdelta_core.overlay.schema import MAX_UNIT, MIN_UNIT, NON_PAYLOAD_REFS

__all__ = ["MAX_IMAGE_SIZE", "OverlayMetadata", "read_metadata"]

MAX_IMAGE_SIZE = 1 << 52  # what a base/self ref address can reach
MAX_IMAGES = 4096
MAX_COMPONENTS = 4096
MAX_COUNT = (1 << 63) - 1  # statistics: units, bytes
#: names the core and plugins chose (components, images, digests): printable, one line, short
_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,255}")
#: ``statistics`` counters, all optional (an overlay from an older writer may lack some)
_COUNTERS = (
    "units",
    "changed",
    "zero",
    "base_memory",
    "base_disk",
    "self",
    "stored_bytes",
    "references_stored_bytes",
)

_TYPE_NAMES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


@attrs.frozen
class OverlayMetadata:
    """The checked metadata: ``components`` and ``images`` are the lists of the JSON document,
    every field the readers use present and of the documented type and range."""

    unit_size: int
    components: list[dict[str, Any]]
    images: list[dict[str, Any]]
    raw: Mapping[str, Any]


class _Fields:
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

    def integer(self, key: str, low: int, high: int, *, optional: bool = False) -> Any:
        value = self._get(key, (int,), optional, False)
        if value is not None and not low <= value <= high:
            raise FormatError(f"overlay metadata: {self.at(key)} = {value} is out of range ({low} to {high})")
        return value

    def name(self, key: str, *, optional: bool = False, null: bool = False) -> Any:
        value = self._get(key, (str,), optional, null)
        if value is not None and not _NAME.fullmatch(value):
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
        """The object at ``key`` as :class:`_Fields`, or ``None`` as :meth:`_get` allows."""
        value = self._get(key, (dict,), optional, null)
        return None if value is None else _Fields(value, self.at(key))

    def array(self, key: str, most: int) -> list[Any]:
        value = self._get(key, (list,), False, False)
        if len(value) > most:
            raise FormatError(f"overlay metadata: {self.at(key)} has {len(value)} entries, more than {most}")
        return value


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def read_metadata(raw: Mapping[str, Any], frames: Sequence[FrameEntry] = ()) -> OverlayMetadata:
    """Check ``raw`` (the decoded metadata) against the format and the frame index.

    :raises FormatError: naming the first field that is missing, of the wrong type or out of range.
    """
    problem = find_problem(raw)
    if problem is not None:
        raise FormatError(f"overlay metadata: {path_text(problem[0]) or 'the document'} {problem[1]}")
    top = _Fields(raw, "")
    if raw.get("format") != "vmdelta-overlay" or type(raw.get("version")) is not int or raw["version"] != 1:
        raise FormatError("overlay metadata does not describe a version 1 vmdelta overlay")
    unit = top.integer("unit_size", MIN_UNIT, MAX_UNIT)
    if unit % MIN_UNIT:
        raise FormatError(f"overlay metadata: unit_size {unit} is not a multiple of 512")
    components = top.array("components", MAX_COMPONENTS)
    _check_components(components)
    images = top.array("images", MAX_IMAGES)
    if not images:
        raise FormatError("overlay metadata lists no images")
    for k, image in enumerate(images):
        _check_image(_Fields(image, f"images[{k}]"))
    for frame in frames:
        if frame.image >= len(images):
            raise FormatError(f"frame at byte {frame.file_offset} belongs to image {frame.image}, which does not exist")
        if frame.kind == KIND_ITEMS and frame.end_offset > images[frame.image]["size"]:
            raise FormatError(f"frame at byte {frame.file_offset} reaches past the end of its image")
    return OverlayMetadata(unit, components, images, raw)


def _check_components(components: list[Any]) -> None:
    codec_ids: set[int] = set()
    encoder_refs: set[int] = set()
    for k, entry in enumerate(components):
        component = _Fields(entry, f"components[{k}]")
        kind = component.choice("kind", ("codec", "encoder", "source", "filter"))
        for key in ("name", "distribution", "version"):
            component.name(key)
        if kind == "codec":
            ident = component.integer("id", 0, 255)
            if ident in codec_ids:
                raise FormatError(f"overlay metadata: {component.at('id')} {ident} names a second codec")
            codec_ids.add(ident)
        elif kind == "encoder":
            ref = component.integer("ref", 0, 0xF)
            if ref in NON_PAYLOAD_REFS:
                raise FormatError(f"overlay metadata: {component.at('ref')} {ref:#x} is reserved for references")
            if ref in encoder_refs:
                raise FormatError(f"overlay metadata: {component.at('ref')} {ref:#x} names a second encoder")
            encoder_refs.add(ref)


def _check_image(image: _Fields) -> None:
    for key in ("name", "source", "base_source", "digest"):
        image.name(key)
    image.choice("kind", ("memory", "disk"))
    image.integer("size", 0, MAX_IMAGE_SIZE - 1)
    image.name("artifact_digest", optional=True, null=True)
    image.text("artifact", optional=True)
    base = image.object("base")
    base.text("name")
    base.name("fingerprint")
    base.integer("size", 0, MAX_IMAGE_SIZE - 1)
    image.object("layout")
    envelope = image.object("envelope", optional=True, null=True)
    if envelope is not None:
        envelope.integer("length", 0, MAX_COUNT)
        envelope.integer("stored", 0, MAX_COUNT)
    for j, entry in enumerate(image.array("filters", MAX_COMPONENTS)):
        f = _Fields(entry, f"{image.at('filters')}[{j}]")
        f.name("name")
        f.text("reason")
        f.integer("dropped", 0, MAX_COUNT)
        f.text("input", optional=True, null=True)
        f.name("input_fingerprint", optional=True, null=True)
        f.object("details", optional=True)
    stats = image.object("statistics")
    for key in _COUNTERS:
        stats.integer(key, 0, MAX_COUNT, optional=True)
    dropped = stats.object("dropped", optional=True)
    if dropped is not None:
        for name in dropped.value:
            _check_key(name, dropped)
            dropped.integer(name, 0, MAX_COUNT)
    encoders = stats.object("encoders", optional=True)
    if encoders is not None:
        for name in encoders.value:
            _check_key(name, encoders)
            entry = encoders.object(name)
            entry.integer("units", 0, MAX_COUNT)
            entry.integer("bytes", 0, MAX_COUNT)
            entry.integer("stored_bytes", 0, MAX_COUNT, optional=True)


def _check_key(name: str, where: _Fields) -> None:
    if not _NAME.fullmatch(name):
        raise FormatError(f"overlay metadata: {where.where} has a key that is not a one-line name")
