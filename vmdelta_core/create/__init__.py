"""``create``: artifacts -> sources -> change detection -> filters -> dedup -> encoders -> overlay."""

from __future__ import annotations

from vmdelta_core.create.pipeline import create_overlay, image_names

__all__ = ["create_overlay", "image_names"]
