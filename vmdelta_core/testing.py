"""Conformance checks for plugin authors.

Call these from a plugin's own tests so that every third-party component gets the same
guarantees as the ones that ship with vmdelta::

    from vmdelta_core.testing import check_encoder

    def test_conformance():
        check_encoder(MyEncoder())

Each check raises ``AssertionError`` with a message saying what the component got wrong.

Besides the checks, this module is what a plugin's tests may use of the core beyond
:mod:`vmdelta_core.plugin` and the library API of :mod:`vmdelta_core`: the fuzz contract
(:func:`check_untrusted`, :func:`fuzz_settings`), the command line (:func:`main`, which returns
the exit code), the registry of the installed plugins (:func:`default_registry`) or of the
plugins a test names (:func:`registry_with`), and the byte
layout of an overlay's end (:data:`TRAILER`, :data:`TRAILER_SIZE`, :data:`FRAME_INDEX_ENTRY`,
:data:`ENTRY_SIZE`) for tests that damage overlays. The pytest fixtures ``fixture_set`` and
``real_pairs`` come with the core (:mod:`vmdelta_core.testing_fixtures`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmdelta_core.cli import main
from vmdelta_core.components import Encoder, Filter, FilterContext, FilterResult, RebuiltImage, Source, SourceImage
from vmdelta_core.errors import FormatError, VmdeltaError
from vmdelta_core.fuzzing import check_untrusted, fuzz_settings
from vmdelta_core.overlay.container import ENTRY_SIZE, TRAILER_SIZE
from vmdelta_core.overlay.schema import FRAME_INDEX_ENTRY, TRAILER
from vmdelta_core.plugins import new_plugin_manager
from vmdelta_core.registry import Registry, default_registry

__all__ = [
    "ENTRY_SIZE",
    "FRAME_INDEX_ENTRY",
    "TRAILER",
    "TRAILER_SIZE",
    "check_encoder",
    "check_encoder_end_to_end",
    "check_filter",
    "check_source",
    "check_untrusted",
    "default_registry",
    "files_identical",
    "fuzz_settings",
    "main",
    "real_fixtures",
    "real_unit_pairs",
    "registry_with",
    "rewrite_overlay",
    "sample_unit_pairs",
    "unit_pairs",
]


def sample_unit_pairs(unit: int = 4096, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(base, modified) pairs covering what real images hold: equal, sparse edits, shifted text,
    zeros to data, data to zeros, random data, a short last unit."""
    rng = np.random.default_rng(seed)
    text = (b"the quick brown fox jumps over the lazy dog; " * (unit // 32 + 1))[:unit]
    noise = rng.integers(0, 256, unit, dtype=np.uint8).tobytes()
    edited = bytearray(text)
    for pos in rng.integers(0, unit, 12):
        edited[pos] ^= 0x5A
    shifted = (b"#" + text)[:unit]
    half = bytes(unit // 2) + noise[: unit - unit // 2]
    return [
        (text, text),
        (text, bytes(edited)),
        (text, shifted),
        (bytes(unit), text),
        (text, bytes(unit)),
        (noise, rng.integers(0, 256, unit, dtype=np.uint8).tobytes()),
        (noise, half),
        (text[:1000], bytes(edited[:1000])),
    ]


def check_encoder(encoder: Encoder, pairs: Sequence[tuple[bytes, bytes]] | None = None) -> dict[str, int]:
    """An encoder round-trips every unit it accepts, declines cleanly, and rejects damage.

    :returns: how many units it accepted and declined, for the caller's own assertions.
    """
    pairs = list(pairs if pairs is not None else sample_unit_pairs())
    bases = [memoryview(base.ljust(len(target), b"\0")[: len(target)]) for base, target in pairs]
    targets = [memoryview(target) for _, target in pairs]
    assert isinstance(encoder.name, str) and encoder.name, "an encoder needs a name"
    wire_ref = getattr(encoder, "wire_ref", None)
    assert wire_ref is None or wire_ref in (0x1, 0x2, 0x7, 0x9) or 0xA <= wire_ref <= 0xF, (
        f"{encoder.name}: wire_ref {wire_ref!r} is taken by a base/self/zero ref"
    )
    payloads = encoder.encode(bases, targets)
    assert len(payloads) == len(pairs), (
        f"{encoder.name}: encode returned {len(payloads)} results for {len(pairs)} units"
    )
    accepted = [i for i, p in enumerate(payloads) if p is not None]
    for i, payload in enumerate(payloads):
        assert payload is None or isinstance(payload, (bytes, bytearray)), (
            f"{encoder.name}: payload {i} is {type(payload).__name__}, not bytes or None"
        )
    if accepted:
        decoded = encoder.decode(
            [bases[i] for i in accepted],
            [memoryview(payloads[i]) for i in accepted],  # type: ignore[arg-type]
            [len(targets[i]) for i in accepted],
        )
        assert len(decoded) == len(accepted), f"{encoder.name}: decode returned the wrong number of units"
        for i, unit in zip(accepted, decoded, strict=True):
            assert bytes(unit) == bytes(targets[i]), f"{encoder.name}: unit {i} does not round-trip"
        # damage: a truncated or garbled payload must raise FormatError or decode to the right
        # length (an encoder without its own checks cannot tell), never anything else
        for i in accepted:
            payload = bytes(payloads[i])  # type: ignore[arg-type]
            for broken in (payload[: len(payload) // 2], bytes(b ^ 0xFF for b in payload[:64]) + payload[64:], b""):
                try:
                    out = encoder.decode([bases[i]], [memoryview(broken)], [len(targets[i])])
                except FormatError:
                    continue
                assert len(out) == 1 and len(out[0]) == len(targets[i]), (
                    f"{encoder.name}: a damaged payload decoded to {len(out[0]) if out else 0} bytes "
                    f"instead of raising FormatError"
                )
    return {"accepted": len(accepted), "declined": len(pairs) - len(accepted)}


def check_source(source: Source, artifact: Path, kind: str, *, options: Mapping[str, Any] | None = None) -> SourceImage:
    """Materializing the image a source read gives an artifact equivalent to the original.

    "Equivalent" means: opening the materialized artifact again yields the same image bytes and
    the same envelope; when the source says ``exact_artifact`` the files must be identical.
    """
    options = dict(options or {})
    image = source.open(artifact, kind=kind, options=options)  # type: ignore[arg-type]
    assert image.data.dtype == np.uint8 and image.data.ndim == 1, "SourceImage.data must be a flat uint8 array"
    assert image.kind == kind
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "image.raw"
        raw.write_bytes(image.data.tobytes())
        out = Path(tmp) / "rebuilt"
        unit = 4096
        rebuilt = RebuiltImage(
            path=raw,
            size=image.size,
            unit_size=unit,
            envelope=image.envelope,
            layout=image.layout,
            changed=np.arange((image.size + unit - 1) // unit, dtype=np.int64),
            base=image,
            base_path=artifact,
            options=options,
        )
        source.materialize(rebuilt, out)
        assert out.exists(), f"{source.name}: materialize wrote nothing at {out}"
        again = source.open(out, kind=kind, options=options)  # type: ignore[arg-type]
        try:
            assert again.size == image.size, f"{source.name}: rebuilt image is {again.size} bytes, not {image.size}"
            assert np.array_equal(again.data, image.data), f"{source.name}: rebuilt image differs"
            assert again.envelope == image.envelope, f"{source.name}: rebuilt envelope differs"
            if image.exact_artifact:
                assert out.read_bytes() == Path(artifact).read_bytes(), (
                    f"{source.name}: artifact not rebuilt byte for byte"
                )
        finally:
            again.close()
    return image


def check_filter(filt: Filter, context: FilterContext, candidates: np.ndarray) -> FilterResult:
    """A filter answers with a mask over exactly the candidates it was given, and a reason."""
    candidates = np.asarray(candidates, dtype=np.int64)
    try:
        result = filt.select(context, candidates.copy())
    except VmdeltaError:
        raise
    assert isinstance(result, FilterResult), f"{filt.name}: select must return a FilterResult"
    drop = np.asarray(result.drop)
    assert drop.dtype == np.bool_, f"{filt.name}: drop must be a boolean mask, got {drop.dtype}"
    assert drop.shape == candidates.shape, f"{filt.name}: mask has shape {drop.shape} for {candidates.shape} candidates"
    assert isinstance(result.reason, str) and result.reason, f"{filt.name}: a drop needs a reason"
    return result


def real_fixtures(set_name: str = "realistic-128") -> Path | None:
    """The unpacked real QEMU fixture set, or ``None`` when it is not available here.

    Looks for the packed fixtures in ``$VMDELTA_SHARED/fixtures`` or ``../shared/fixtures`` of
    the repository, unpacks them once (``unpack.sh``, needs ``zstd``) into
    ``$VMDELTA_FIXTURES`` (default ``/tmp/vmdelta-fixtures``) and returns that set's folder. With
    ``VMDELTA_REQUIRE_FIXTURES=1`` (as in CI) a missing set is an error instead of ``None``.
    """
    import os
    import shutil
    import subprocess

    required = os.environ.get("VMDELTA_REQUIRE_FIXTURES") == "1"
    here = Path(__file__).resolve()
    candidates = [Path(os.environ["VMDELTA_SHARED"]) / "fixtures"] if os.environ.get("VMDELTA_SHARED") else []
    candidates += [parent / "shared" / "fixtures" for parent in here.parents]
    packed = next((c for c in candidates if (c / "unpack.sh").is_file()), None)
    if packed is None or shutil.which("zstd") is None:
        if required:
            raise RuntimeError("real fixtures required but shared/fixtures or the zstd command is missing")
        return None
    dest = Path(os.environ.get("VMDELTA_FIXTURES", "/tmp/vmdelta-fixtures"))
    subprocess.run(["bash", str(packed / "unpack.sh"), str(dest)], check=True, stdout=subprocess.DEVNULL)
    found = dest / set_name
    if not found.is_dir():
        if required:
            raise RuntimeError(f"fixture set {set_name} not found in {dest}")
        return None
    return found


def real_unit_pairs(limit: int = 300, seed: int = 0) -> dict[str, list[tuple[bytes, bytes]]] | None:
    """(base unit, modified unit) pairs at the same offset, cut from the real captures.

    ``"memory"``: changed pages of a guest's RAM (the raw ``pc.ram`` of an x-ignore-shared
    capture); ``"disk"``: changed 4 KiB blocks of its ext4 disk. A spread sample of at most
    ``limit`` each, or ``None`` when the fixtures are not available here.
    """
    found = real_fixtures()
    if found is None:
        return None
    ram = found / "variants" / "qemu-7.2-ignore-shared"
    return {
        "memory": _changed_pairs(ram / "base-ram.raw", ram / "modified-ram.raw", limit, seed),
        "disk": _changed_pairs(found / "base.img", found / "modified.img", limit, seed),
    }


def _changed_pairs(base: Path, modified: Path, limit: int, seed: int, unit: int = 4096) -> list[tuple[bytes, bytes]]:
    b = np.memmap(base, dtype=np.uint8, mode="r")
    m = np.memmap(modified, dtype=np.uint8, mode="r")
    n = min(b.size, m.size) // unit
    changed = np.flatnonzero((b[: n * unit].reshape(n, unit) != m[: n * unit].reshape(n, unit)).any(axis=1))
    pick = np.sort(np.random.default_rng(seed).choice(changed, size=min(limit, changed.size), replace=False))
    return [(bytes(b[i * unit : (i + 1) * unit]), bytes(m[i * unit : (i + 1) * unit])) for i in pick]


def check_encoder_end_to_end(name: str, folder: Path, policy: str = "fixed") -> dict[str, Any]:
    """``vmdelta create --encoder NAME`` / ``inspect`` / ``apply`` on a small disk pair of text
    with small edits, rewritten and new units: the encoder takes units, the overlay names it, and
    the rebuilt disk is identical. Returns the encoder's statistics from the overlay."""
    import contextlib
    import io
    import json

    rng = np.random.default_rng(7)
    words = np.array([w.encode() for w in ["alpha", "beta", "gamma", "delta", "kernel", "page", "cache", "inode"]])
    text = b" ".join(rng.choice(words, 200_000))[: 1 << 20]
    base, modified = bytearray(text), bytearray(text)
    for unit in range(0, 256, 3):  # small in-place edits
        for pos in rng.integers(0, 4096, 6):
            modified[unit * 4096 + int(pos)] ^= 0x20
    for unit in range(1, 256, 17):  # rewritten with other words
        modified[unit * 4096 : (unit + 1) * 4096] = b" ".join(rng.choice(words, 1000))[:4096]
    b, m = folder / "base.img", folder / "modified.img"
    b.write_bytes(bytes(base))
    m.write_bytes(bytes(modified))
    overlay, rebuilt = folder / "overlay.vmdo", folder / "rebuilt.img"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["create", "-q", "-o", str(overlay), "--disk", str(b), str(m), "--encoder", name, "--policy", policy]
        )
        assert code == 0, f"create with encoder {name} failed ({code})"
        out.truncate(0)
        out.seek(0)
        assert main(["inspect", "--json", str(overlay)]) == 0
    meta = json.loads(out.getvalue())["metadata"]
    (image,) = meta["images"]
    stats = image["statistics"]["encoders"]
    assert stats.get(name, {}).get("units", 0) > 0, f"{name} took no unit: {stats}"
    assert name in {c["name"] for c in meta["components"] if c["kind"] == "encoder"}
    assert main(["apply", "-q", str(overlay), "--disk", str(b), str(rebuilt)]) == 0
    assert rebuilt.read_bytes() == m.read_bytes(), f"{name}: the rebuilt disk differs"
    return stats[name]


def files_identical(a: Path, b: Path) -> bool:
    """Byte-for-byte equality of two (possibly large) files, read in chunks."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True


def rewrite_overlay(
    data: bytes, *, metadata: dict | None = None, envelope: tuple[int, bytes, int] | None = None
) -> bytes:
    """An overlay's bytes with its metadata or one image's envelope frame replaced (or added),
    every offset and checksum recomputed: damage that every integrity check of the container lets
    through, for testing what a source's ``materialize`` does with a hostile envelope or layout.

    :param envelope: ``(image number, stored frame, decompressed length)``.
    """
    import json
    import struct

    import xxhash

    trailer = TRAILER.parse(data[-TRAILER_SIZE:])
    entries = [
        dict(FRAME_INDEX_ENTRY.parse(data[trailer.index_offset + k * ENTRY_SIZE :][:ENTRY_SIZE]))
        for k in range(trailer.index_count)
    ]
    frames = [(e, data[e["file_offset"] : e["file_offset"] + e["stored_length"]]) for e in entries]
    if envelope is not None:
        image, stored, length = envelope
        frames = [f for f in frames if not (f[0]["image"] == image and f[0]["kind"] == "envelope")]
        entry = {"image": image, "kind": "envelope", "codec": 0, "item_count": 0, "first_offset": 0, "end_offset": 0}
        after = max((k + 1 for k, (e, _) in enumerate(frames) if e["image"] <= image), default=0)
        frames.insert(after, ({**entry, "length": length}, stored))
    if metadata is None:
        metadata = json.loads(data[trailer.metadata_offset : trailer.metadata_offset + trailer.metadata_length])
    meta = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    out = bytearray(data[:16])
    index = []
    for entry, stored in frames:
        fields = {**entry, "file_offset": len(out), "stored_length": len(stored)}
        index.append(FRAME_INDEX_ENTRY.build({**fields, "checksum": xxhash.xxh3_64_intdigest(stored)}))
        out += stored
    metadata_offset = len(out)
    out += meta
    index_bytes = b"".join(index)
    index_offset = len(out)
    out += index_bytes
    out += struct.pack(
        ">QQQQQQ",
        metadata_offset,
        len(meta),
        xxhash.xxh3_64_intdigest(meta),
        index_offset,
        len(index),
        xxhash.xxh3_64_intdigest(index_bytes),
    )
    return bytes(out + xxhash.xxh3_64_intdigest(bytes(out)).to_bytes(8, "big") + b"VMDLTEND")


def unit_pairs() -> Any:
    """A hypothesis strategy of (base unit, modified unit) pairs: a base with a few edits, or an
    unrelated target, of any length up to 4096 bytes. Needs ``hypothesis`` (a test dependency)."""
    from hypothesis import strategies as st

    @st.composite
    def pairs(draw: Any) -> tuple[bytes, bytes]:
        base = draw(st.binary(min_size=1, max_size=4096))
        target = bytearray(draw(st.binary(min_size=1, max_size=4096)) if draw(st.booleans()) else base)
        for pos, data in draw(
            st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=64)), max_size=8)
        ):
            pos = min(pos, len(target))
            target[pos : pos + len(data)] = data
        return base, bytes(target)

    return pairs()


def registry_with(*plugins: object, load_entry_points: bool = False, blocked: frozenset[str] = frozenset()) -> Registry:
    """A registry of its own: the builtins and ``plugins`` (modules or objects with hook
    implementations, named after their module or class), and the installed plugins only when
    ``load_entry_points``. Pass it as ``registry=`` to the library API; the process's registry
    (:func:`default_registry`) is left as it was."""
    pm = new_plugin_manager(load_entry_points=load_entry_points, blocked=blocked)
    for plugin in plugins:
        pm.register(plugin, name=getattr(plugin, "__name__", type(plugin).__name__))
    return Registry(pm)
