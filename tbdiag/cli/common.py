"""What every command shares: consoles (data to stdout, the rest to stderr), user-error handling, the
choices of options, and output files (checked before any work, written all or none)."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from tbdiag.errors import TbdiagError

STDOUT = "-"


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    try:  # tables use ± → ≥ …: a stream that cannot encode them (an ASCII locale) shows "?" instead of failing
        "±→≥…─".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    # Piped output keeps full rows instead of wrapping at 80 columns.
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 200)


out_console = _console(stderr=False)
err_console = _console(stderr=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (newlines, terminal escape sequences) written as escapes: a name or
    path from a file stays on one line and cannot drive the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def safe(text: str, style: str = "") -> "Text":
    """A Rich `Text` of a string from a file: never markup, control characters escaped (`printable`)."""
    from rich.text import Text

    return Text(printable(text), style=style)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `TbdiagError` into ``error: <message>`` on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except TbdiagError as exc:
        err_console.print(f"error: {printable(exc.cli_message())}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        raise typer.Exit(130) from None


# Choices of options: str-valued enums, so that --help lists them and a typo fails with exit code 2.
class Fit(str, Enum):
    median = "median"
    ks = "ks"
    peak = "peak"


class Precision(str, Enum):
    float64 = "float64"
    float32 = "float32"


class Estimator(str, Enum):
    full = "full"
    farms = "farms"


class MapName(str, Enum):
    linear = "linear"
    sqrt = "sqrt"
    log2 = "log2"
    step = "step"
    sigmoid = "sigmoid"


class Metric(str, Enum):
    alpha = "alpha"
    alpha_weighted = "alpha_weighted"
    spectral_norm = "spectral_norm"


class Unit(str, Enum):
    layer = "layer"
    block = "block"


OVERWRITE_HELP = "Replace an existing checkpoint named as an output (refused without it)."
KEY_HELP = "Entry of a nested checkpoint holding the weights, e.g. 'ema'; in a safetensors file, the name prefix of the tensors to read."


def choices(enum: type[Enum]) -> str:
    """The metavar of a choice option, ``[a|b|c]``: written here so that help does not depend on Typer."""
    return "[" + "|".join(str(m.value) for m in enum) + "]"


FLAG = ""  # metavar of on/off and counting options: nothing after the option name


def require(ok: bool, option: str, value: object, why: str) -> None:
    """Raise ``<option> <value>: <why>`` (one line, exit code 2 through `user_errors`) unless ``ok``."""
    if not ok:
        raise TbdiagError(f"{option} {value}: {why}")


def require_finite(value: float, option: str, why: str) -> None:
    """`require` a finite number: ``nan`` and ``inf`` are accepted by the number parser."""
    require(math.isfinite(value), option, value, why)


@dataclass(frozen=True)
class Outputs:
    """A command's output targets (option name → where it goes), checked before any work starts.

    Files are checked with `tbdiag.io.outputs.check_outputs` (no folder, no missing folder, no two options on one
    file, never an input or a file of an input folder) and written together with
    `tbdiag.io.outputs.write_outputs` (all or none); one option at most may name ``-``, standard output.
    """

    files: Mapping[str, Path]
    stdout: str | None

    @classmethod
    def check(cls, targets: Mapping[str, str | None], inputs: Sequence[str | Path], *, overwrite: bool = False) -> Outputs:
        from tbdiag.io.outputs import check_outputs

        chosen = {option: t for option, t in targets.items() if t is not None}
        to_stdout = [option for option, t in chosen.items() if t == STDOUT]
        if len(to_stdout) > 1:
            raise TbdiagError(f"{' and '.join(f'{o} -' for o in to_stdout)}: only one of them can go to stdout; "
                              "write the other to a file")
        files = {option: t for option, t in chosen.items() if t != STDOUT}
        checked = check_outputs(list(files.values()), inputs, overwrite=overwrite)
        return cls(dict(zip(files, checked)), to_stdout[0] if to_stdout else None)

    def write(self, texts: Mapping[str, str]) -> None:
        """Write every file (all or none), then the standard-output one."""
        from tbdiag.io.outputs import write_outputs

        write_outputs([(path, texts[option]) for option, path in self.files.items()])
        if self.stdout is not None:
            typer.echo(texts[self.stdout], nl=False)
