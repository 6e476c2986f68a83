"""The one exception tree of vmdelta.

Every failure a user can cause (bad input, a wrong base, a missing plugin, a broken config) is a
:class:`VmdeltaError`; the CLI prints its message on one line and exits non-zero. Anything else
escaping is a bug.
"""

from __future__ import annotations

__all__ = [
    "BaseMismatchError",
    "ConfigError",
    "FormatError",
    "IntegrityError",
    "PluginError",
    "StorageError",
    "VmdeltaError",
]


class VmdeltaError(Exception):
    """Base of every error vmdelta raises on purpose."""

    exit_code = 1


class FormatError(VmdeltaError):
    """An input file is not what it claims to be, or is damaged in a way its structure shows."""

    exit_code = 3


class IntegrityError(VmdeltaError):
    """A checksum or digest does not match: the data were damaged after they were written."""

    exit_code = 4


class BaseMismatchError(VmdeltaError):
    """The base given to ``apply`` is not the one the overlay was created against."""

    exit_code = 5


class PluginError(VmdeltaError):
    """A plugin is missing, blocked, misbehaving or registers a name already taken."""

    exit_code = 6


class ConfigError(VmdeltaError):
    """A pipeline configuration or a command line asks for something impossible."""

    exit_code = 2


class StorageError(VmdeltaError):
    """The system refused to read or write a file: no space, no permission, a read-only file
    system, an I/O error. The message names the user's path."""

    exit_code = 7
