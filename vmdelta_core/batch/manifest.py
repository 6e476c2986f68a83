"""The batch manifest: many VMs, each written as a pipeline file writes one overlay.

A manifest is validated against ``schemas/batch.schema.json``, which takes the overlay table and
the image pairs of each VM from ``schemas/pipeline.schema.json`` by reference: a VM says what a
pipeline says, in the same words (filters, encoders, sources, their options). Each VM then
becomes the :class:`~vmdelta_core.config.CreateConfig` a pipeline would build, through the same
function, so a VM of a batch and a ``vmdelta run`` of the same lines make the same overlay.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from vmdelta_core.config import CreateConfig, config_from_mapping, pipeline_schema
from vmdelta_core.errors import ConfigError
from vmdelta_core.fileio import check_input
from vmdelta_core.jsonvalue import find_problem, path_text

__all__ = ["MAX_MANIFEST_BYTES", "Fleet", "VmSpec", "load_manifest"]

#: ten thousand VMs of a few disks each fit in a few MiB; past this the file is a mistake
MAX_MANIFEST_BYTES = 64 << 20
#: a manifest is a list of pipelines: one level deeper than a pipeline may be
_MAX_DEPTH = 33


@attrs.frozen
class VmSpec:
    """One VM of a batch: its name (in progress and the report) and its overlay's config."""

    name: str
    config: CreateConfig


@attrs.frozen
class Fleet:
    """What a batch makes: its VMs, the report to write, and the shard size of large images."""

    vms: tuple[VmSpec, ...] = attrs.field(converter=tuple)
    report: Path | None = None
    #: images larger than this are made in address-range shards of about this size; ``None``: never
    shard_size: int | None = None

    def __attrs_post_init__(self) -> None:
        if not self.vms:
            raise ConfigError("the batch has no VM")
        _check_unique(self.vms)


def _check_unique(vms: Sequence[VmSpec]) -> None:
    """Two VMs of one name could not be told apart in the report; two of one overlay would write
    the same file; an overlay that is another VM's input would be replaced under its reader."""
    names: set[str] = set()
    outputs: dict[str, str] = {}
    for vm in vms:
        if vm.name in names:
            raise ConfigError(f"two VMs are named {vm.name!r}; give each VM its own name")
        names.add(vm.name)
        output = os.path.abspath(vm.config.output)
        if output in outputs:
            raise ConfigError(f"VMs {outputs[output]!r} and {vm.name!r} both write {vm.config.output}")
        outputs[output] = vm.name
    for vm in vms:
        for spec in vm.config.images:
            for path in spec.input_paths():
                writer = outputs.get(os.path.abspath(path))
                if writer is not None:
                    raise ConfigError(f"VM {vm.name!r} reads {path}, which VM {writer!r} writes")


def batch_schema() -> dict[str, Any]:
    text = resources.files("vmdelta_core").joinpath("schemas/batch.schema.json").read_text()
    return json.loads(text)


def _validator() -> Any:
    """The manifest's validator: the pipeline schema registered for its references, and an
    integer an int (TOML tells ``4096`` and ``4096.0`` apart; JSON Schema would not)."""
    import jsonschema
    import referencing

    pipeline = pipeline_schema()
    registry = referencing.Registry().with_resource(pipeline["$id"], referencing.Resource.from_contents(pipeline))
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(base, type_checker=checker)(batch_schema(), registry=registry)


def load_manifest(path: Path) -> Fleet:
    """Read and validate a TOML manifest; relative paths are relative to its folder.

    :raises ConfigError: naming the manifest, and the VM and field at fault.
    """
    path = Path(path)
    check_input(path, "manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ConfigError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (RecursionError, ValueError):
        raise ConfigError(f"{path}: nested too deep or holds a number too large to read") from None
    # absolute: the workers of a cluster need not share this process's working folder
    return fleet_from_mapping(data, folder=Path(os.path.abspath(path.parent)), origin=str(path))


def fleet_from_mapping(data: Mapping[str, Any], *, folder: Path, origin: str = "manifest") -> Fleet:
    """A :class:`Fleet` from a manifest's data, checked against the schema first."""
    problem = find_problem(data, max_depth=_MAX_DEPTH, scalars=None)
    if problem is not None:
        raise ConfigError(f"{origin}: {path_text(problem[0], slashes=True) or 'top level'} {problem[1]}")
    errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        first = errors[0]
        where = path_text(tuple(first.absolute_path), slashes=True) or "top level"
        message = first.message if len(first.message) <= 200 else first.message[:200] + "..."
        raise ConfigError(f"{origin}: {where}: {message}")
    defaults = data.get("defaults", {})
    vms = []
    for number, entry in enumerate(data["vms"]):
        name = entry.get("name") or _name_of(entry["overlay"]["output"])
        # one thread a VM unless asked: the workers' threads are the batch's parallelism
        overlay = {"threads": 1, **defaults, **entry["overlay"]}
        pipeline = {"overlay": overlay, "images": entry["images"]}
        config = config_from_mapping(pipeline, folder=folder, origin=f"{origin}: vms/{number} ({name})")
        vms.append(VmSpec(name, config))
    settings = data.get("batch", {})
    report = folder / settings["report"] if "report" in settings else None
    return Fleet(vms, report=report, shard_size=settings.get("shard_size"))


def _name_of(output: str) -> str:
    """``out/tenant-a.overlay`` -> ``tenant-a``."""
    return Path(output).stem or Path(output).name
