"""vmdelta encoder plugin ``xdelta3``: per-unit VCDIFF deltas against the base (ref 0x2)."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.plugin import Encoder, hookimpl
from vmdelta_encoder_xdelta3.c_vcdiff import check_payload
from vmdelta_encoder_xdelta3.encoder import DEFAULT_LEVEL, Xdelta3Encoder

__all__ = ["DEFAULT_LEVEL", "Xdelta3Encoder", "check_payload"]


@hookimpl
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    register(Xdelta3Encoder())
