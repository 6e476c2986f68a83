"""The overlay's metadata block, checked before anything trusts it.

Overlays are untrusted input: every field ``apply`` and ``inspect`` rely on is checked for type
and range here, so damage or a hostile file ends in one :class:`FormatError` instead of a
traceback or an absurd allocation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from vmdelta_core.container import KIND_ITEMS, FrameEntry
from vmdelta_core.errors import FormatError

__all__ = ["MAX_IMAGE_SIZE", "OverlayMetadata", "read_metadata"]

MAX_IMAGE_SIZE = 1 << 52  # what a base/self ref address can reach


@attrs.frozen
class OverlayMetadata:
    unit_size: int
    components: list[dict[str, Any]]
    images: list[dict[str, Any]]
    raw: Mapping[str, Any]


def _need(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise FormatError(f"overlay metadata: {where} lacks {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise FormatError(f"overlay metadata: {where}.{key} has the wrong type")
    return value


def read_metadata(raw: Mapping[str, Any], frames: Sequence[FrameEntry]) -> OverlayMetadata:
    if raw.get("format") != "vmdelta-overlay" or raw.get("version") != 1:
        raise FormatError("overlay metadata does not describe a version 1 vmdelta overlay")
    unit = _need(raw, "unit_size", int, "top level")
    if not 512 <= unit <= 65024 or unit % 512:
        raise FormatError(f"overlay metadata: unit size {unit} is out of range")
    components = _need(raw, "components", list, "top level")
    for k, component in enumerate(components):
        where = f"components[{k}]"
        kind = _need(component, "kind", str, where)
        for key in ("name", "distribution", "version"):
            _need(component, key, str, where)
        if kind == "codec" and not 0 <= _need(component, "id", int, where) <= 255:
            raise FormatError(f"overlay metadata: {where} has a bad codec id")
        if kind == "encoder" and not 0 <= _need(component, "ref", int, where) <= 0xF:
            raise FormatError(f"overlay metadata: {where} has a bad ref id")
    images = _need(raw, "images", list, "top level")
    if not images or len(images) > 4096:
        raise FormatError("overlay metadata lists no images, or too many")
    for k, image in enumerate(images):
        where = f"images[{k}]"
        for key in ("name", "source", "base_source", "digest"):
            _need(image, key, str, where)
        if _need(image, "kind", str, where) not in ("memory", "disk"):
            raise FormatError(f"overlay metadata: {where} has an unknown kind")
        size = _need(image, "size", int, where)
        if not 0 <= size < MAX_IMAGE_SIZE:
            raise FormatError(f"overlay metadata: {where} size {size} is out of range")
        base = _need(image, "base", dict, where)
        _need(base, "fingerprint", str, where + ".base")
        _need(base, "name", str, where + ".base")
        if not 0 <= _need(base, "size", int, where + ".base") < MAX_IMAGE_SIZE:
            raise FormatError(f"overlay metadata: {where}.base size is out of range")
        _need(image, "layout", dict, where)
        for f in _need(image, "filters", list, where):
            _need(f, "name", str, where + ".filters")
            if _need(f, "dropped", int, where + ".filters") < 0:
                raise FormatError(f"overlay metadata: {where}.filters has a negative count")
        if image.get("artifact_digest") is not None:
            _need(image, "artifact_digest", str, where)
        _need(image, "statistics", dict, where)
    for frame in frames:
        if frame.image >= len(images):
            raise FormatError(f"frame at byte {frame.file_offset} belongs to image {frame.image}, which does not exist")
        if frame.kind == KIND_ITEMS and frame.end_offset > images[frame.image]["size"]:
            raise FormatError(f"frame at byte {frame.file_offset} reaches past the end of its image")
    return OverlayMetadata(unit, components, images, raw)
