"""The ``tbdiag`` command line: one module per command, registered on one Typer app."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from tbdiag import __version__
from tbdiag.cli.analyze import analyze_command
from tbdiag.cli.recommend import recommend_command
from tbdiag.cli.report import report_command
from tbdiag.cli.train import train_command

app = typer.Typer(name="tbdiag", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Per-layer heavy-tailed spectral diagnostics (HT-SR alpha) and TempBalance training.")
app.command("analyze", no_args_is_help=True)(analyze_command)
app.command("recommend", no_args_is_help=True)(recommend_command)
app.command("train", no_args_is_help=True)(train_command)
app.command("report", no_args_is_help=True)(report_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tbdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output on stderr (-vv: debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def main() -> None:
    """Console-script entry point."""
    app()
