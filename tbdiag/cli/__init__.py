"""The ``tbdiag`` command line: one module per command, registered on one Typer app."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from tbdiag import __version__
from tbdiag.cli.analyze import analyze_command
from tbdiag.cli.common import FLAG, err_console, printable
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


# Typer ≥ 0.29 vendors click, older Typer uses click itself: take the classes from what Typer raises.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def usage_error_line(exc: Exception, command_path: str) -> str:
    """One line for a command-line mistake: what was wrong, and where to look (instead of a boxed panel)."""
    message = printable(" ".join(exc.format_message().split()).replace("Value error, ", "").rstrip("."))  # type: ignore[attr-defined]
    if not isinstance(exc, _USAGE_ERROR):
        return f"error: {message}"
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else command_path
    return f"error: {message}{' ' if message.endswith('?') else '; '}see '{path} --help'"


def _terminated(signum: int, frame: object) -> None:
    err_console.print("terminated", markup=False)
    raise SystemExit(128 + signum)  # through every `finally`: nothing half-written stays behind


class _Group(_HelpFlag, TyperGroup):
    """The root command: usage errors (typos in choices, unknown options, bad numbers) print one line and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001, ANN201
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds like ^C: temporaries go
            signal.signal(signal.SIGTERM, _terminated)
        argv = list(sys.argv[1:] if args is None else args)
        path = " ".join(["tbdiag", *[a for a in argv if a in self.commands][:1]])
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `tbdiag analyze` alone shows the help
                if exc.format_message().strip():  # Typer's rich help is printed already, as it is built
                    exc.show()
                sys.exit(exc.exit_code)
            err_console.print(usage_error_line(exc, path), markup=False, soft_wrap=True)
            sys.exit(2)
        except _CLICK_ERROR as exc:
            err_console.print(usage_error_line(exc, path), markup=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt, EOFError):
            err_console.print("interrupted", markup=False)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


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
