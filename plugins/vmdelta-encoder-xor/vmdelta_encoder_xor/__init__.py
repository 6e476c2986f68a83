"""vmdelta encoder plugin ``xor``: XOR against the base, as runs of non-zero bytes (ref 0x9)."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.plugin import Encoder, hookimpl
from vmdelta_encoder_xor.encoder import DEFAULT_MERGE_GAP, MODES, XorEncoder
from vmdelta_encoder_xor.runs import decode_runs, encode_runs

__all__ = ["DEFAULT_MERGE_GAP", "MODES", "XorEncoder", "decode_runs", "encode_runs"]


@hookimpl
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    register(XorEncoder())
