"""What a batch made: one result per VM, its overlay or its error, as the JSON report says it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from vmdelta_core.outputs import OutputSet

__all__ = ["BatchReport", "VmResult"]


@attrs.frozen
class VmResult:
    """One VM: the overlay written (size in bytes, seconds on its worker and the processor
    seconds they took, statistics per image), or the one-line error that stopped it."""

    name: str
    overlay: Path
    error: str | None = None
    size: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    images: tuple[dict[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "overlay": str(self.overlay), "ok": self.ok}
        if self.ok:
            out.update(size=self.size, seconds=self.seconds, cpu_seconds=self.cpu_seconds, images=list(self.images))
        else:
            out["error"] = self.error
        return out


@attrs.frozen
class BatchReport:
    """Every VM of a batch, in manifest order, and where it ran."""

    vms: tuple[VmResult, ...]
    seconds: float
    scheduler: str
    workers: int
    dashboard: str | None = None
    #: one entry per distinct base: its path, fingerprint, whether its index was cached, seconds
    bases: tuple[dict[str, Any], ...] = ()

    @property
    def failed(self) -> tuple[VmResult, ...]:
        return tuple(vm for vm in self.vms if not vm.ok)

    @property
    def succeeded(self) -> bool:
        """Whether every VM's overlay was written."""
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "succeeded": self.succeeded,
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "scheduler": self.scheduler,
            "workers": self.workers,
            "total_size": sum(vm.size for vm in self.vms),
            "bases": list(self.bases),
            "vms": [vm.to_json() for vm in self.vms],
        }

    def write(self, path: Path) -> None:
        """The report as JSON at ``path``, which appears whole or not at all."""
        import json

        with OutputSet([]) as outputs:
            pending = outputs.add(path)
            with open(pending.path, "w") as f:
                json.dump(self.to_json(), f, indent=2, sort_keys=True)
                f.write("\n")
            outputs.commit()
