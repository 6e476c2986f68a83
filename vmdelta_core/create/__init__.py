"""``create``: artifacts -> sources -> change detection -> filters -> dedup -> encoders -> overlay.

The stages, in the order :func:`create_overlay` runs them: :mod:`.plan` (the config checked
against what is installed), :mod:`.sources` (artifacts opened, bases indexed), :mod:`.changes`,
:mod:`.filters`, :mod:`.units` (dedup by :mod:`.dedup`, encoding by :mod:`.encode`), then the
overlay written by :mod:`vmdelta_core.overlay`.
"""

from __future__ import annotations

from vmdelta_core.create.pipeline import create_overlay
from vmdelta_core.create.plan import image_names

__all__ = ["create_overlay", "image_names"]
