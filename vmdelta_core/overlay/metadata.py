"""The overlay's metadata as frozen records, and their one boundary with JSON.

Overlays are untrusted input. :meth:`OverlayMetadata.from_json` checks every field ``apply``,
``inspect`` and the reports read, once, for presence, type and range, and builds the records;
afterwards a field is known to be there and of its type: damage or a hostile file ends in one
:class:`FormatError` naming the field, never in a traceback or an absurd allocation. Values that
are the business of a plugin or of people (an image's ``layout``, a filter's ``details``, the
recorded ``settings`` of each image) are only held to the bounds of :mod:`vmdelta_core.jsonvalue`.
:meth:`OverlayMetadata.to_json` gives back the document as ``create`` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from vmdelta_core.errors import FormatError
from vmdelta_core.jsonvalue import find_problem, path_text
from vmdelta_core.overlay.container import FORMAT_VERSION, KIND_ITEMS, FrameEntry
from vmdelta_core.overlay.fields import Fields
from vmdelta_core.overlay.parts import join_document, split_document
from vmdelta_core.overlay.schema import MAX_UNIT, MIN_UNIT, NON_PAYLOAD_REFS

__all__ = [
    "MAX_IMAGE_SIZE",
    "BaseRecord",
    "ComponentRecord",
    "EncoderUse",
    "EnvelopeRecord",
    "FilterRecord",
    "ImageRecord",
    "ImageStatistics",
    "OverlayMetadata",
    "Settings",
    "join_document",
    "split_document",
]

FORMAT_NAME = "vmdelta-overlay"
MAX_IMAGE_SIZE = 1 << 52  # what a base/self ref address can reach
MAX_IMAGES = 4096
MAX_COMPONENTS = 4096
MAX_COUNT = (1 << 63) - 1  # statistics: units, bytes

ImageKindName = Literal["memory", "disk"]


def _frozen_map(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return dict(value)


@attrs.frozen
class ComponentRecord:
    """A component that made the overlay: a codec has its frame ``id``, an encoder its ``ref``."""

    kind: Literal["codec", "encoder", "source", "filter"]
    name: str
    distribution: str
    version: str
    id: int | None = None
    ref: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
        }
        if self.kind == "codec":
            out["id"] = self.id
        elif self.kind == "encoder":
            out["ref"] = self.ref
        return out

    @classmethod
    def from_json(cls, fields: Fields) -> ComponentRecord:
        kind = fields.choice("kind", ("codec", "encoder", "source", "filter"))
        ident = ref = None
        if kind == "codec":
            ident = fields.integer("id", 0, 255)
        elif kind == "encoder":
            ref = fields.integer("ref", 0, 0xF)
            if ref in NON_PAYLOAD_REFS:
                raise FormatError(f"overlay metadata: {fields.at('ref')} {ref:#x} is reserved for references")
        return cls(kind, fields.name("name"), fields.name("distribution"), fields.name("version"), ident, ref)  # type: ignore[arg-type]


@attrs.frozen
class BaseRecord:
    """The base an image was made against, as ``apply`` checks it."""

    name: str  # as the user spelt it, for messages
    source: str
    size: int
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "size": self.size, "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, fields: Fields, default_source: str) -> BaseRecord:
        source = fields.name("source", optional=True)
        return cls(
            fields.text("name"),
            default_source if source is None else source,
            fields.integer("size", 0, MAX_IMAGE_SIZE - 1),
            fields.name("fingerprint"),
        )


#: runs of dropped units a filter record lists at most (beyond, where they were is not recorded)
MAX_FILTER_RUNS = 1 << 16


@attrs.frozen
class FilterRecord:
    """What one filter dropped from an image, and from what input; ``runs``: where, as sorted
    ``(first unit, count)`` runs, when they were few enough to record."""

    name: str
    reason: str
    dropped: int
    input: str | None = None
    input_fingerprint: str | None = None
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map)
    runs: tuple[tuple[int, int], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "input": self.input,
            "input_fingerprint": self.input_fingerprint,
            "reason": self.reason,
            "dropped": self.dropped,
            "details": dict(self.details),
        }
        if self.runs is not None:
            out["runs"] = [list(run) for run in self.runs]
        return out

    @classmethod
    def from_json(cls, fields: Fields) -> FilterRecord:
        details = fields.object("details", optional=True)
        dropped = fields.integer("dropped", 0, MAX_COUNT)
        runs = None
        if "runs" in fields.value:
            runs = _runs(fields.array("runs", MAX_FILTER_RUNS), dropped, fields.at("runs"))
        return cls(
            fields.name("name"),
            fields.text("reason"),
            dropped,
            fields.text("input", optional=True, null=True),
            fields.name("input_fingerprint", optional=True, null=True),
            {} if details is None else details.value,
            runs,
        )


def _runs(value: list[Any], dropped: int, where: str) -> tuple[tuple[int, int], ...]:
    """``[first, count]`` pairs, sorted, apart, counting ``dropped`` units in all."""
    runs: list[tuple[int, int]] = []
    end = 0
    for run in value:
        if (
            not isinstance(run, list)
            or len(run) != 2
            or not all(type(x) is int for x in run)
            or run[0] < end
            or not 1 <= run[1] <= MAX_COUNT - run[0]
        ):
            raise FormatError(f"overlay metadata: {where} is not a list of sorted, separate [unit, count] runs")
        runs.append((run[0], run[1]))
        end = run[0] + run[1] + 1
    if sum(count for _, count in runs) != dropped:
        raise FormatError(f"overlay metadata: {where} counts other units than the {dropped} dropped")
    return tuple(runs)


@attrs.frozen
class EnvelopeRecord:
    """An image's envelope: its length, and what it costs stored."""

    length: int
    stored: int

    def to_json(self) -> dict[str, Any]:
        return {"length": self.length, "stored": self.stored}


@attrs.frozen
class EncoderUse:
    """How much of an image one encoder wrote: units, payload bytes, share of the stored frames."""

    units: int
    bytes: int
    stored_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"units": self.units, "bytes": self.bytes}
        if self.stored_bytes is not None:
            out["stored_bytes"] = self.stored_bytes
        return out


@attrs.frozen
class ImageStatistics:
    """The counts of one image: every counter is optional in the format (an older writer may
    lack some) and reads as 0 then."""

    units: int = 0
    changed: int = 0
    dropped: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_map)
    zero: int = 0
    base_memory: int = 0
    base_disk: int = 0
    earlier: int = 0  # same as an earlier unit of the overlay ("self" in the document)
    encoders: Mapping[str, EncoderUse] = attrs.field(factory=dict, converter=_frozen_map)
    stored_bytes: int = 0
    references_stored_bytes: int = 0

    _COUNTERS = (
        ("units", "units"),
        ("changed", "changed"),
        ("zero", "zero"),
        ("base_memory", "base_memory"),
        ("base_disk", "base_disk"),
        ("self", "earlier"),
        ("stored_bytes", "stored_bytes"),
        ("references_stored_bytes", "references_stored_bytes"),
    )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, attr) for key, attr in self._COUNTERS}
        out["dropped"] = dict(self.dropped)
        out["encoders"] = {name: use.to_json() for name, use in self.encoders.items()}
        return out

    @classmethod
    def from_json(cls, fields: Fields) -> ImageStatistics:
        counts = {attr: fields.integer(key, 0, MAX_COUNT, optional=True) or 0 for key, attr in cls._COUNTERS}
        dropped = fields.object("dropped", optional=True)
        encoders = fields.object("encoders", optional=True)
        uses = {}
        for name in [] if encoders is None else encoders.names():
            entry = encoders.object(name)
            uses[name] = EncoderUse(
                entry.integer("units", 0, MAX_COUNT),
                entry.integer("bytes", 0, MAX_COUNT),
                entry.integer("stored_bytes", 0, MAX_COUNT, optional=True),
            )
        return cls(
            dropped={} if dropped is None else {name: dropped.integer(name, 0, MAX_COUNT) for name in dropped.names()},
            encoders=uses,
            **counts,
        )


@attrs.frozen
class ImageRecord:
    """One image of the overlay: what it is, what it was made against, how to check it."""

    name: str
    kind: ImageKindName
    source: str
    base_source: str
    size: int
    digest: str
    base: BaseRecord
    statistics: ImageStatistics
    artifact: str | None = None
    artifact_digest: str | None = None
    layout: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_map)
    envelope: EnvelopeRecord | None = None
    filters: tuple[FilterRecord, ...] = attrs.field(default=(), converter=tuple)
    encoders: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    policy: str = "fixed"

    @property
    def dropped(self) -> dict[str, int]:
        """Units each filter dropped (rebuilt from the base at apply)."""
        return {f.name: f.dropped for f in self.filters}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "base_source": self.base_source,
            "artifact": self.artifact,
            "size": self.size,
            "digest": self.digest,
            "artifact_digest": self.artifact_digest,
            "layout": dict(self.layout),
            "envelope": None if self.envelope is None else self.envelope.to_json(),
            "filters": [f.to_json() for f in self.filters],
            "encoders": list(self.encoders),
            "policy": self.policy,
            "statistics": self.statistics.to_json(),
            "base": self.base.to_json(),
        }

    @classmethod
    def from_json(cls, fields: Fields, *, prologue: bool = False) -> ImageRecord:
        """The image ``fields`` describe; with ``prologue``, only its prologue fields, the others
        left empty until the epilogue arrives."""
        base_source = fields.name("base_source")
        encoders = fields.value.get("encoders", [])
        policy = fields.value.get("policy", "fixed")
        common = {
            "name": fields.name("name"),
            "kind": fields.choice("kind", ("memory", "disk")),
            "source": fields.name("source"),
            "base_source": base_source,
            "size": fields.integer("size", 0, MAX_IMAGE_SIZE - 1),
            "base": BaseRecord.from_json(fields.object("base"), base_source),
            "artifact": fields.text("artifact", optional=True, null=True),
            "layout": fields.object("layout").value,
        }
        if prologue:
            return cls(digest="", statistics=ImageStatistics(), **common)  # type: ignore[arg-type]
        envelope = fields.object("envelope", optional=True, null=True)
        return cls(
            **common,  # type: ignore[arg-type]
            digest=fields.name("digest"),
            statistics=ImageStatistics.from_json(fields.object("statistics")),
            artifact_digest=fields.name("artifact_digest", optional=True, null=True),
            envelope=None
            if envelope is None
            else EnvelopeRecord(envelope.integer("length", 0, MAX_COUNT), envelope.integer("stored", 0, MAX_COUNT)),
            filters=[
                FilterRecord.from_json(Fields(entry, f"{fields.at('filters')}[{j}]"))
                for j, entry in enumerate(fields.array("filters", MAX_COMPONENTS))
            ],
            # recorded for people: their shape is not checked beyond the JSON bounds
            encoders=[e for e in encoders if isinstance(e, str)] if isinstance(encoders, list) else [],
            policy=policy if isinstance(policy, str) else "fixed",
        )


@attrs.frozen
class Settings:
    """What ``create`` was asked, without the creator's folders: recorded for people and never
    read by ``apply``; ``images`` holds each image's settings as recorded."""

    unit_size: int
    codec: str
    level: int | None
    frame_size: int
    encoder_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, converter=_frozen_map)
    images: tuple[Mapping[str, Any], ...] = attrs.field(default=(), converter=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit_size": self.unit_size,
            "codec": self.codec,
            "level": self.level,
            "frame_size": self.frame_size,
            "encoder_options": {name: dict(options) for name, options in self.encoder_options.items()},
            "images": [dict(image) for image in self.images],
        }

    @classmethod
    def from_json(cls, fields: Fields) -> Settings:
        options = fields.object("encoder_options")
        return cls(
            fields.integer("unit_size", MIN_UNIT, MAX_UNIT),
            fields.name("codec"),
            fields.integer("level", -(1 << 31), 1 << 31, null=True),
            fields.integer("frame_size", 1, MAX_COUNT),
            {name: options.object(name).value for name in options.names()},
            [
                Fields(entry, f"{fields.at('images')}[{k}]").value
                for k, entry in enumerate(fields.array("images", MAX_IMAGES))
            ],
        )


@attrs.frozen
class OverlayMetadata:
    """The metadata of an overlay, checked (:meth:`from_json`) or about to be written."""

    unit_size: int
    creator: Mapping[str, Any] = attrs.field(converter=_frozen_map)
    components: tuple[ComponentRecord, ...] = attrs.field(converter=tuple)
    images: tuple[ImageRecord, ...] = attrs.field(converter=tuple)
    settings: Settings

    def to_json(self) -> dict[str, Any]:
        """The document ``create`` writes."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "creator": dict(self.creator),
            "unit_size": self.unit_size,
            "components": [c.to_json() for c in self.components],
            "images": [image.to_json() for image in self.images],
            "settings": self.settings.to_json(),
        }

    def codecs(self) -> dict[int, ComponentRecord]:
        """Codecs by the frame id they were given."""
        return {c.id: c for c in self.components if c.kind == "codec" and c.id is not None}

    def encoders(self) -> dict[int, ComponentRecord]:
        """Encoders by the ref id they were given."""
        return {c.ref: c for c in self.components if c.kind == "encoder" and c.ref is not None}

    @classmethod
    def from_json(
        cls, raw: Mapping[str, Any], frames: Sequence[FrameEntry] = (), *, prologue: bool = False
    ) -> OverlayMetadata:
        """Check ``raw`` (the decoded metadata) against the format and the frame index.

        :param prologue: ``raw`` is the prologue of a stream-form overlay: its images lack what
            comes after the frames (digests, statistics, filters, envelope), left empty here.
        :raises FormatError: naming the first field that is missing, of the wrong type or out of
            range.
        """
        problem = find_problem(raw)
        if problem is not None:
            raise FormatError(f"overlay metadata: {path_text(problem[0]) or 'the document'} {problem[1]}")
        top = Fields(raw, "")
        if raw.get("format") != FORMAT_NAME or type(raw.get("version")) is not int or raw["version"] != FORMAT_VERSION:
            raise FormatError("overlay metadata does not describe a version 1 vmdelta overlay")
        unit = top.integer("unit_size", MIN_UNIT, MAX_UNIT)
        if unit % MIN_UNIT:
            raise FormatError(f"overlay metadata: unit_size {unit} is not a multiple of {MIN_UNIT}")
        components = [
            ComponentRecord.from_json(Fields(entry, f"components[{k}]"))
            for k, entry in enumerate(top.array("components", MAX_COMPONENTS))
        ]
        _check_unique(components)
        images = [
            ImageRecord.from_json(Fields(entry, f"images[{k}]"), prologue=prologue)
            for k, entry in enumerate(top.array("images", MAX_IMAGES))
        ]
        if not images:
            raise FormatError("overlay metadata lists no images")
        for frame in frames:
            if frame.image >= len(images):
                raise FormatError(
                    f"frame at byte {frame.file_offset} belongs to image {frame.image}, which does not exist"
                )
            if frame.kind == KIND_ITEMS and frame.end_offset > images[frame.image].size:
                raise FormatError(f"frame at byte {frame.file_offset} reaches past the end of its image")
        creator = raw.get("creator")
        settings = Settings.from_json(top.object("settings"))
        return cls(unit, creator if isinstance(creator, dict) else {}, components, images, settings)


def _check_unique(components: list[ComponentRecord]) -> None:
    """One codec per frame id, one encoder per ref."""
    seen: set[tuple[str, int]] = set()
    for k, c in enumerate(components):
        key = ("codec", c.id) if c.kind == "codec" else ("encoder", c.ref) if c.kind == "encoder" else None
        if key is None:
            continue
        if key in seen:
            field, what = ("id", "codec") if c.kind == "codec" else ("ref", "encoder")
            value = key[1] if c.kind == "codec" else f"{key[1]:#x}"
            raise FormatError(f"overlay metadata: components[{k}].{field} {value} names a second {what}")
        seen.add(key)  # type: ignore[arg-type]
