"""vmdelta encoder plugin ``bsdiff``: per-unit BSDIFF40 patches against the base (ref 0x7)."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.components import Encoder
from vmdelta_core.hookspecs import hookimpl
from vmdelta_encoder_bsdiff.encoder import BsdiffEncoder

__all__ = ["BsdiffEncoder"]


@hookimpl
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    register(BsdiffEncoder())
