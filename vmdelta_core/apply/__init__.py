"""``apply`` (VM synthesis): base + overlay -> the customized VM, verified before it appears."""

from __future__ import annotations

from vmdelta_core.apply.synthesis import apply_overlay

__all__ = ["apply_overlay"]
