"""``vmdelta inspect OVERLAY --map map.png``: each image's address space as a picture.

Every image is a grid read like text (address 0 top left, rows left to right): one cell per unit
while the image has at most :data:`MAX_PIXELS` units, else one cell per run of units; a cell is a
pixel, or a small square of pixels for a small image. Each cell is coloured by how the overlay
rebuilds its units: unchanged (the base's), zero, a reference into the base memory, the base
disk or an earlier unit of the overlay, or a payload of one encoder. A cell covering a run takes
the class most of its changed units have, so a single changed unit never disappears into a sea of
unchanged ones.

Units a filter dropped are drawn in a colour of that filter's, where the overlay records them
(as runs, when they are at most :data:`~vmdelta_core.overlay.metadata.MAX_FILTER_RUNS`);
otherwise, as in overlays made before it did, as unchanged (they are the base's after apply), the
legend giving their count.

The picture needs Pillow (``pip install 'vmdelta-core[map]'``), imported only when a map is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import numpy as np

from vmdelta_core.cli.output import human_size
from vmdelta_core.errors import ConfigError, FormatError
from vmdelta_core.outputs import OutputSet
from vmdelta_core.overlay.container import OverlayReader
from vmdelta_core.overlay.metadata import ImageRecord, OverlayMetadata
from vmdelta_core.overlay.schema import Ref

if TYPE_CHECKING:
    from PIL import Image

    from vmdelta_core.registry import Registry

__all__ = [
    "MAX_PIXELS",
    "ImageMap",
    "MapClass",
    "cell_size",
    "draw_map",
    "overlay_classes",
    "read_image_maps",
    "write_map",
]

#: pixels of one image's grid at most (1024 x 1024): larger images get one pixel per run of units
MAX_PIXELS = 1 << 20
INSTALL_HINT = "inspect --map draws with Pillow, which is not installed: pip install 'vmdelta-core[map]'"

UNCHANGED, ZERO, BASE_MEMORY, BASE_DISK, EARLIER = range(5)
_FIXED_REFS = {int(Ref.ZEROS): ZERO, int(Ref.BASE_MEM): BASE_MEMORY, int(Ref.BASE_DISK): BASE_DISK}
_FIXED_REFS[int(Ref.SELF)] = EARLIER

_COLOURS = [
    (222, 222, 222),  # unchanged
    (70, 70, 70),  # zero
    (66, 133, 244),  # base memory
    (52, 168, 83),  # base disk
    (251, 188, 5),  # earlier unit
]
#: one per encoder, in the order the overlay's components list them
_ENCODER_COLOURS = [
    (234, 67, 53),
    (171, 71, 188),
    (255, 112, 67),
    (0, 172, 193),
    (141, 110, 99),
    (236, 64, 122),
    (124, 179, 66),
    (92, 107, 192),
]
#: one per filter that dropped units: pale, as the units are the base's after apply
_FILTER_COLOURS = [(206, 147, 216), (128, 222, 234), (197, 225, 165), (255, 204, 128), (176, 190, 197)]
_BACKGROUND, _INK = (255, 255, 255), (0, 0, 0)
_MARGIN, _SWATCH, _LINE = 10, 12, 16


@attrs.frozen
class MapClass:
    """One colour of the map: what it means and its RGB."""

    label: str
    colour: tuple[int, int, int]


def overlay_classes(meta: OverlayMetadata) -> tuple[list[MapClass], dict[int, int]]:
    """The classes a map of ``meta`` uses, and the class of each item ref."""
    classes = [
        MapClass(label, colour)
        for label, colour in zip(
            ("unchanged", "zero", "same as base memory", "same as base disk", "same as an earlier unit"),
            _COLOURS,
            strict=True,
        )
    ]
    by_ref = dict(_FIXED_REFS)
    for number, (ref, component) in enumerate(sorted(meta.encoders().items())):
        by_ref[ref] = len(classes)
        colour = _ENCODER_COLOURS[number % len(_ENCODER_COLOURS)]
        classes.append(MapClass(f"encoder {component.name}", colour))
    for number, name in enumerate(_placed_filters(meta)):
        classes.append(MapClass(f"dropped by {name}", _FILTER_COLOURS[number % len(_FILTER_COLOURS)]))
    return classes, by_ref


def _placed_filters(meta: OverlayMetadata) -> list[str]:
    """The filters whose dropped units the overlay places (in the order of their names)."""
    return sorted({f.name for image in meta.images for f in image.filters if f.runs})


@attrs.frozen
class ImageMap:
    """One image as pixels: ``pixels[i]`` is the class of units ``[i * per_pixel, (i + 1) *
    per_pixel)``, ``counts[c]`` the units of class ``c`` (exact, whatever the scale)."""

    image: ImageRecord
    units: int
    per_pixel: int
    pixels: np.ndarray
    counts: np.ndarray


def read_image_maps(reader: OverlayReader, meta: OverlayMetadata, registry: Registry) -> Iterator[ImageMap]:
    """The map of each image of an overlay file, its item frames read one at a time (memory
    stays bounded by the picture, whatever size the overlay claims for its images)."""
    classes, by_ref = overlay_classes(meta)
    codecs = {ident: registry.codec(c.name) for ident, c in meta.codecs().items()}
    lookup = np.full(16, UNCHANGED, dtype=np.int64)
    for ref, cls in by_ref.items():
        lookup[ref] = cls
    for number, image in enumerate(meta.images):
        unit = meta.unit_size
        units = -(-image.size // unit)
        per_pixel = max(1, -(-units // MAX_PIXELS))
        pixel_count = -(-units // per_pixel)
        tally = np.zeros((pixel_count, len(classes)), dtype=np.int64)
        for entry in reader.frames_of(number):
            items = reader.items(entry, codecs[entry.codec])
            last = np.append(items.offsets[1:] != items.offsets[:-1], True)  # a live repeat: the later wins
            indices = items.offsets[last] // np.uint64(unit)
            if indices.size and int(indices.max()) >= units:
                raise FormatError(f"{reader.path}: frame at byte {entry.file_offset} reaches past image {image.name}")
            kinds = lookup[items.refs[last].astype(np.int64)]
            np.add.at(tally, (indices.astype(np.int64) // per_pixel, kinds), 1)
        placed = {name: len(classes) - len(_placed_filters(meta)) + k for k, name in enumerate(_placed_filters(meta))}
        for f in image.filters:
            if f.runs:
                tally[:, placed[f.name]] += _run_counts(f.runs, units, per_pixel, pixel_count, reader.path)
        # the units no item names are the base's
        sizes = np.full(pixel_count, per_pixel, dtype=np.int64)
        if pixel_count:
            sizes[-1] = units - per_pixel * (pixel_count - 1)
        tally[:, UNCHANGED] = sizes - tally[:, 1:].sum(axis=1)
        yield ImageMap(image, units, per_pixel, _pixel_classes(tally), tally.sum(axis=0))


def _run_counts(runs: tuple[tuple[int, int], ...], units: int, per_pixel: int, pixels: int, path: Path) -> np.ndarray:
    """Units of ``runs`` under each pixel: the difference of the units dropped before each
    pixel's first unit (runs are sorted and apart, so that is a search, not a walk)."""
    starts = np.array([start for start, _ in runs], dtype=np.int64)
    counts = np.array([count for _, count in runs], dtype=np.int64)
    if int(starts[-1] + counts[-1]) > units:
        raise FormatError(f"{path}: a filter's dropped units reach past their image")
    before = np.concatenate(([0], np.cumsum(counts)))  # units in the runs before run i
    edges = np.minimum(np.arange(pixels + 1, dtype=np.int64) * per_pixel, units)
    i = np.searchsorted(starts, edges, side="right") - 1
    inside = np.where(i >= 0, np.clip(edges - starts[np.maximum(i, 0)], 0, counts[np.maximum(i, 0)]), 0)
    dropped_before = np.where(i >= 0, before[np.maximum(i, 0)], 0) + inside
    return np.diff(dropped_before)


def _pixel_classes(tally: np.ndarray) -> np.ndarray:
    """Each pixel's class: the most common among its changed units, unchanged if none changed."""
    changed = tally[:, 1:]
    if not changed.size:
        return np.zeros(tally.shape[0], dtype=np.uint8)
    return np.where(changed.sum(axis=1) > 0, changed.argmax(axis=1) + 1, UNCHANGED).astype(np.uint8)


def _grid_width(pixels: int) -> int:
    """Near-square grids, in steps of 64 cells, from 128 to 1024 wide."""
    return max(128, min(1024, -(-math.isqrt(pixels) // 64) * 64))


def cell_size(m: ImageMap) -> int:
    """Pixels a side of each cell of ``m``'s grid in the picture."""
    return _zoom(_grid_width(m.pixels.size))


def _zoom(width: int) -> int:
    """Pixels a side of each cell: small grids are drawn larger, up to 4 x 4 pixels a cell."""
    return max(1, min(4, 512 // width))


def draw_map(meta: OverlayMetadata, maps: list[ImageMap]) -> Image.Image:
    """The picture: a title and a grid per image, then the legend with every class's units.

    A palette image: index ``c`` is class ``c`` in the grids and nowhere else (the legend's
    swatches use copies of the colours at other indices), so counting pixels by index counts
    cells (:func:`cell_size` pixels a side).
    """
    from PIL import Image, ImageDraw, ImageFont

    classes, _ = overlay_classes(meta)
    background, ink = len(classes), len(classes) + 1
    swatches = ink + 1
    palette = [*(c.colour for c in classes), _BACKGROUND, _INK, *(c.colour for c in classes)]

    blocks = [(m, _grid_width(m.pixels.size)) for m in maps]
    legend = _legend_lines(meta, classes, maps)
    font = ImageFont.load_default()
    texts = [text for _, text in legend] + [_image_title(meta, m) for m in maps]
    texts += [_image_scale(meta, m, w) for m, w in blocks]
    measure = ImageDraw.Draw(Image.new("P", (1, 1)))  # text in a palette image is not anti-aliased, so wider
    widths = [_SWATCH + 6 + math.ceil(measure.textlength(t, font=font)) for t in texts]
    width = max([*(w * _zoom(w) for _, w in blocks), *widths])
    width += 2 * _MARGIN
    height = _MARGIN + sum(2 * _LINE + -(-m.pixels.size // w) * _zoom(w) + _MARGIN for m, w in blocks)
    height += (len(legend) + 1) * _LINE + _MARGIN
    picture = Image.new("P", (width, height), background)
    picture.putpalette([value for colour in palette for value in colour])
    draw = ImageDraw.Draw(picture)
    y = _MARGIN
    for m, w in blocks:
        draw.text((_MARGIN, y), _image_title(meta, m), fill=ink, font=font)
        draw.text((_MARGIN, y + _LINE), _image_scale(meta, m, w), fill=ink, font=font)
        y += 2 * _LINE
        rows, zoom = -(-m.pixels.size // w), _zoom(w)
        if rows:
            grid = np.full(rows * w, background, dtype=np.uint8)
            grid[: m.pixels.size] = m.pixels
            cells = Image.frombytes("P", (w, rows), grid.tobytes())
            picture.paste(cells.resize((w * zoom, rows * zoom), Image.Resampling.NEAREST), (_MARGIN, y))
        y += rows * zoom + _MARGIN
    draw.text((_MARGIN, y), "legend (units of every image)", fill=ink, font=font)
    y += _LINE
    for swatch, text in legend:
        if swatch is not None:
            draw.rectangle((_MARGIN, y + 1, _MARGIN + _SWATCH - 1, y + _SWATCH), fill=swatches + swatch)
        draw.text((_MARGIN + _SWATCH + 6, y), text, fill=ink, font=font)
        y += _LINE
    return picture


def _image_title(meta: OverlayMetadata, m: ImageMap) -> str:
    return f"{m.image.name} ({m.image.kind}, {m.image.source}): {m.units} units of {meta.unit_size} bytes"


def _image_scale(meta: OverlayMetadata, m: ImageMap, width: int) -> str:
    zoom = _zoom(width)
    cell = "1 pixel" if zoom == 1 else f"{zoom}x{zoom} pixels"
    per = "1 unit" if m.per_pixel == 1 else f"{m.per_pixel} units (their most common change)"
    return f"{cell} = {per}; rows of {width * m.per_pixel} units from address 0"


def _legend_lines(meta: OverlayMetadata, classes: list[MapClass], maps: list[ImageMap]) -> list[tuple[int | None, str]]:
    totals = sum((m.counts for m in maps), np.zeros(len(classes), dtype=np.int64))
    lines: list[tuple[int | None, str]] = [
        (number, f"{c.label}: {int(totals[number])} units{_paid(meta, c)}") for number, c in enumerate(classes)
    ]
    references = sum(image.statistics.references_stored_bytes for image in meta.images)
    lines.append((None, f"the references (zero, base, earlier unit) stored in {human_size(references)}"))
    for image in meta.images:
        for f in image.filters:
            if f.dropped and not f.runs:
                where = "drawn as unchanged: the overlay does not say where"
                lines.append((None, f"{image.name}: dropped by {f.name}: {f.dropped} units ({where})"))
    return lines


def _paid(meta: OverlayMetadata, c: MapClass) -> str:
    """What the overlay paid for an encoder's units: payload bytes, and as stored."""
    if not c.label.startswith("encoder "):
        return ""
    uses = [i.statistics.encoders.get(c.label.removeprefix("encoder ")) for i in meta.images]
    payload = sum(use.bytes for use in uses if use)
    stored = sum(use.stored_bytes or 0 for use in uses if use)
    return f", {human_size(payload)} of payload stored in {human_size(stored)}"


def write_map(overlay: Path, target: Path, registry: Registry) -> list[ImageMap]:
    """Draw ``overlay``'s map into ``target``, which appears only once it is whole.

    :raises ConfigError: Pillow is not installed, or the overlay is standard input.
    """
    try:
        import PIL  # noqa: F401  (the one check, before any work)
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    with OverlayReader(overlay) as reader:
        meta = OverlayMetadata.from_json(reader.metadata, reader.frames)
        maps = list(read_image_maps(reader, meta, registry))
    picture = draw_map(meta, maps)
    with OutputSet([overlay]) as outputs:
        pending = outputs.add(target)
        try:
            with open(pending.path, "wb") as f:
                picture.save(f, format="PNG", optimize=True)
        except OSError as exc:
            raise outputs.explain(exc, target) from None
        outputs.commit()
    return maps
