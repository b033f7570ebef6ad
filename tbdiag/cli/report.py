"""``tbdiag report``: one self-contained HTML file from checkpoints, saved analyses or training runs."""

from __future__ import annotations

from typing import Annotated

import typer

from tbdiag.cli.common import FLAG, OVERWRITE_HELP, Fit, choices, err_console, user_errors


def report_command(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT", help="Analysis JSON files, checkpoints, or training run folders.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", metavar="FILE", help="The HTML file to write.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar=FLAG, help=OVERWRITE_HELP)] = False,
    fit: Annotated[Fit, typer.Option(metavar=choices(Fit), help="Estimator for checkpoints analysed here (the HT-SR bands are calibrated on ks).")] = Fit.ks,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N (checkpoints analysed here).")] = "auto",
) -> None:
    """Write an HTML report: one checkpoint, a comparison of several (a trajectory), or training runs."""
    from tbdiag.errors import TbdiagError
    from tbdiag.report.render import write_report

    with user_errors():
        if out == "-":
            raise TbdiagError("--out -: an HTML report goes to a file; name one")
        kind = write_report(inputs, out, overwrite=overwrite, fit=fit.value, device=device)
        err_console.print(f"wrote {kind} report {out}", markup=False)
