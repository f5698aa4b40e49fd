"""The one error type for user mistakes.

Everything a user can fix (a bad config key or value, bad data, a missing or incompatible checkpoint,
a wrong command line) raises a subclass of `NanoT5Error`. The CLI prints such an error as one line
and exits with code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class NanoT5Error(Exception):
    """A mistake the user can fix; its message names the key, file, line or option."""


class ConfigError(NanoT5Error, ValueError):
    """A bad key or value in a config file or on the command line."""


class DataError(NanoT5Error, ValueError):
    """Bad input data or a bad source spec; the message names the file and line (or record)."""


class CheckpointError(NanoT5Error, RuntimeError):
    """A checkpoint or run directory that is missing, incomplete, corrupt, incompatible or locked."""
