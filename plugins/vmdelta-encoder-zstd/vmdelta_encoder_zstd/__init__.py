"""vmdelta encoder plugin ``zstd``: zstd with the base unit as dictionary (a free ref id)."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.plugin import Encoder, hookimpl
from vmdelta_encoder_zstd.encoder import DEFAULT_LEVEL, ZstdEncoder, window_log

__all__ = ["DEFAULT_LEVEL", "ZstdEncoder", "window_log"]


@hookimpl
def vmdelta_register_encoders(register: Callable[[Encoder], None]) -> None:
    register(ZstdEncoder())
