"""vmdelta encoder plugin ``bsdiff``: per-unit BSDIFF40 patches against the base (ref 0x7)."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.plugin import Encoder, hookimpl
from vmdelta_encoder_bsdiff.encoder import BsdiffEncoder

__all__ = ["BsdiffEncoder"]


@hookimpl
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    register(BsdiffEncoder())
