"""vmdelta filter ``xray``: disk units that are free blocks of an ext2/3/4 filesystem."""

from __future__ import annotations

from collections.abc import Callable

from vmdelta_core.plugin import Filter, hookimpl
from vmdelta_filter_xray.ext4 import Ext4, Unsupported
from vmdelta_filter_xray.filter import XrayFilter, free_ranges
from vmdelta_filter_xray.journal import replay_journal
from vmdelta_filter_xray.partitions import Volume, find_volumes

__all__ = ["Ext4", "Unsupported", "Volume", "XrayFilter", "find_volumes", "free_ranges", "replay_journal"]


@hookimpl
def vmdelta_register_filters(register: Callable[[Filter], None]) -> None:
    register(XrayFilter())
