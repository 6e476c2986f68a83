"""The two parts of a stream-form overlay's metadata: what a reader needs before the frames
(the prologue) and what is known only after them (the epilogue)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmdelta_core.errors import FormatError

__all__ = ["PROLOGUE_IMAGE_KEYS", "join_document", "split_document"]

#: the fields of an image a stream-form overlay gives before its frames (what apply needs to
#: start: the base to check, the geometry, the components); the others come after the frames
PROLOGUE_IMAGE_KEYS = frozenset(
    {"name", "kind", "source", "base_source", "artifact", "size", "base", "layout", "encoders", "policy"}
)


def split_document(document: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A metadata document as a stream-form overlay carries it: the prologue (everything but the
    images' outcome) and the epilogue (each image's digests, statistics, filters, envelope)."""
    prologue = {key: value for key, value in document.items() if key != "images"}
    prologue["images"] = [{k: v for k, v in image.items() if k in PROLOGUE_IMAGE_KEYS} for image in document["images"]]
    epilogue = {
        "images": [{k: v for k, v in image.items() if k not in PROLOGUE_IMAGE_KEYS} for image in document["images"]]
    }
    return prologue, epilogue


def join_document(prologue: Mapping[str, Any], epilogue: Mapping[str, Any]) -> dict[str, Any]:
    """The document :func:`split_document` split (both parts untrusted: checked for shape here,
    for content by :meth:`OverlayMetadata.from_json`).

    :raises FormatError: the parts do not fit together.
    """
    images, outcomes = prologue.get("images"), epilogue.get("images")
    if not isinstance(images, list) or not isinstance(outcomes, list) or len(images) != len(outcomes):
        raise FormatError("overlay epilogue does not describe the images of its prologue")
    if set(epilogue) != {"images"}:
        raise FormatError("overlay epilogue holds fields other than images")
    joined = []
    for k, (image, outcome) in enumerate(zip(images, outcomes, strict=True)):
        if not isinstance(image, dict) or set(image) - PROLOGUE_IMAGE_KEYS:
            raise FormatError(f"overlay prologue: images[{k}] holds what only the epilogue may give")
        if not isinstance(outcome, dict) or PROLOGUE_IMAGE_KEYS & set(outcome):
            raise FormatError(f"overlay epilogue: images[{k}] does not complete its prologue")
        joined.append({**image, **outcome})
    return {**prologue, "images": joined}
