"""What every command shares: consoles (data to stdout, the rest to stderr) and user-error handling."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from tbdiag.errors import TbdiagError

def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output keeps full rows instead of wrapping at 80 columns.
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 200)


out_console = _console(stderr=False)
err_console = _console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `TbdiagError` into ``error: <message>`` on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except TbdiagError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        raise typer.Exit(130) from None


def write_output(target: str, text: str) -> None:
    """Write ``text`` to a file atomically, or to stdout when ``target`` is ``-``."""
    from tbdiag.export import atomic_write

    if target == "-":
        typer.echo(text, nl=False)
    else:
        atomic_write(target, text)
