"""The ``tbdiag`` command line: one module per command, registered on one Typer app."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from tbdiag import __version__
from tbdiag.cli.analyze import analyze_command
from tbdiag.cli.common import FLAG
from tbdiag.cli.diff import diff_command
from tbdiag.cli.prune import prune_command
from tbdiag.cli.recommend import recommend_command
from tbdiag.cli.report import report_command
from tbdiag.cli.train import train_command


class _HelpFlag:
    """``--help`` is a flag: no ``<bool>`` metavar after it, whatever the Typer version."""

    def get_help_option(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = FLAG
        return option


class _Command(_HelpFlag, TyperCommand):
    pass


class _Group(_HelpFlag, TyperGroup):
    pass


app = typer.Typer(name="tbdiag", cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Per-layer heavy-tailed spectral diagnostics (HT-SR alpha) and TempBalance training.")
app.command("analyze", cls=_Command, no_args_is_help=True)(analyze_command)
app.command("recommend", cls=_Command, no_args_is_help=True)(recommend_command)
app.command("train", cls=_Command, no_args_is_help=True)(train_command)
app.command("report", cls=_Command, no_args_is_help=True)(report_command)
app.command("diff", cls=_Command, no_args_is_help=True)(diff_command)
app.command("prune", cls=_Command, no_args_is_help=True)(prune_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tbdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, metavar=FLAG, show_default=False, help="More log output on stderr (-vv: debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", metavar=FLAG, callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def main() -> None:
    """Console-script entry point."""
    app()
