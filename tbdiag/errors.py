"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class TbdiagError(Exception):
    """A user-facing error: what went wrong, where, and what to do.

    The message is a single line; the CLI prints it as ``error: <message>`` and exits with code 2.
    """


class CheckpointError(TbdiagError):
    """A checkpoint could not be found, recognised or read safely."""
