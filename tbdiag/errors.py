"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

from collections.abc import Mapping


class TbdiagError(Exception):
    """A user-facing error: what went wrong, where, and what to do.

    The message is a single line in the library's words (parameter names such as ``trust_pickle=True``,
    never command-line flags); the CLI prints it as ``error: <message>`` and exits with code 2.

    Args:
        message: the line.
        cli: how the CLI words the parameters the message names: ``{"trust_pickle=True": "--trust-pickle"}``.
    """

    def __init__(self, message: str, *, cli: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.cli = dict(cli or {})

    def cli_message(self) -> str:
        """The message with the library's parameter names replaced by the CLI's flags."""
        text = str(self)
        for library, flag in self.cli.items():
            text = text.replace(library, flag)
        return text


class CheckpointError(TbdiagError):
    """A checkpoint could not be found, recognised or read safely."""
