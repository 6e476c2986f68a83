"""Value objects the API returns: what ``create`` made and what ``apply`` rebuilt."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from vmdelta_core.overlay.metadata import ImageRecord, ImageStatistics, OverlayMetadata

__all__ = ["ApplyReport", "CreateReport", "ImageReport", "NullProgress", "Progress", "RebuiltReport"]


class Progress(Protocol):
    """Where long work reports how far it got (the CLI draws bars; the API default is silent)."""

    def start(self, description: str, total: int) -> Callable[[int], None]:
        """Begin a task of ``total`` steps (bytes); returns a function to advance it."""
        ...


class NullProgress:
    def start(self, description: str, total: int) -> Callable[[int], None]:
        return lambda n: None


@attrs.frozen
class ImageReport:
    """Statistics of one image in an overlay, as stored in its metadata."""

    name: str
    kind: str
    source: str
    size: int
    statistics: ImageStatistics

    @classmethod
    def from_record(cls, image: ImageRecord) -> ImageReport:
        return cls(image.name, image.kind, image.source, image.size, image.statistics)

    def to_json(self) -> dict[str, object]:
        """As ``create --json`` prints it: the statistics as the overlay stores them."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "size": self.size,
            "statistics": self.statistics.to_json(),
        }


@attrs.frozen
class CreateReport:
    """What ``create_overlay`` wrote."""

    output: Path
    size: int
    seconds: float
    images: tuple[ImageReport, ...]
    metadata: OverlayMetadata = attrs.field(repr=False)


@attrs.frozen
class RebuiltReport:
    """One artifact ``apply_overlay`` rebuilt."""

    name: str
    kind: str
    output: Path
    size: int
    digest: str
    artifact_identical: bool
    dropped: Mapping[str, int]
    #: the digest of the artifact file it is identical to, when ``artifact_identical``
    artifact_digest: str | None = None


@attrs.frozen
class ApplyReport:
    """What ``apply_overlay`` rebuilt and verified."""

    overlay: Path
    seconds: float
    images: tuple[RebuiltReport, ...]
