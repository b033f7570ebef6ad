"""``tbdiag recommend``: TempBalance learning-rate multipliers from a checkpoint's alphas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tbdiag.cli.common import (FLAG, Fit, MapName, Metric, Outputs, Unit, choices, out_console, require,
                               require_finite, user_errors)

MAP, INPUT = "TempBalance map", "Input"


def recommend_command(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="Checkpoint file or folder.", show_default=False)],
    map: Annotated[MapName, typer.Option(metavar=choices(MapName), help="How alphas become multipliers (sqrt and log2 ignore the ratios).", rich_help_panel=MAP)] = MapName.linear,
    min_ratio: Annotated[float, typer.Option(metavar="X", help="Smallest multiplier (finite, > 0).", rich_help_panel=MAP)] = 0.5,
    max_ratio: Annotated[float, typer.Option(metavar="X", help="Largest multiplier (finite, ≥ --min-ratio).", rich_help_panel=MAP)] = 1.5,
    metric: Annotated[Metric, typer.Option(metavar=choices(Metric), help="What the map reads.", rich_help_panel=MAP)] = Metric.alpha,
    unit: Annotated[Unit, typer.Option(metavar=choices(Unit), help="One multiplier per layer, or per transformer block.", rich_help_panel=MAP)] = Unit.layer,
    keep_first_last: Annotated[bool, typer.Option("--keep-first-last", metavar=FLAG, help="Also tune the first and last Conv/Linear.", rich_help_panel=MAP)] = False,
    min_evals: Annotated[int, typer.Option(metavar="N", help="Layers with fewer eigenvalues keep multiplier 1 (N ≥ 0).", rich_help_panel=MAP)] = 50,
    fit: Annotated[Fit, typer.Option(metavar=choices(Fit), help="Estimator (TempBalance fits median).", rich_help_panel=MAP)] = Fit.median,
    lr: Annotated[Optional[float], typer.Option(metavar="LR", help="Base learning rate (> 0): also show and write each layer's lr.", rich_help_panel=MAP)] = None,
    key: Annotated[Optional[str], typer.Option(metavar="NAME", help="Entry of a nested checkpoint holding the weights.", rich_help_panel=INPUT)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", metavar=FLAG, help="Allow full unpickling (trusted files only).", rich_help_panel=INPUT)] = False,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=INPUT)] = "auto",
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="FILE", help="Write the tbdiag.multipliers/v1 JSON here ('-': stdout).")] = None,
) -> None:
    """Turn a checkpoint's per-layer alphas into TempBalance learning-rate multipliers."""
    from tbdiag.analysis import analyze
    from tbdiag.export import jsonable
    from tbdiag.tempbalance.recommend import recommend

    with user_errors():
        require_finite(min_ratio, "--min-ratio", "must be a finite number; e.g. 0.5")
        require_finite(max_ratio, "--max-ratio", "must be a finite number; e.g. 1.5")
        require(0 < min_ratio <= max_ratio, "--min-ratio/--max-ratio", f"{min_ratio:g}/{max_ratio:g}",
                "need 0 < min ≤ max; e.g. 0.5 and 1.5")
        require(min_evals >= 0, "--min-evals", min_evals, "must be 0 or more")
        if lr is not None:
            require_finite(lr, "--lr", "must be a finite number; e.g. 0.1")
            require(lr > 0, "--lr", lr, "must be positive; e.g. 0.1")
        outputs = Outputs.check({"--out": out}, [path])
        analysis = analyze(str(path), fit=fit.value, key=key, trust_pickle=trust_pickle, device=device)
        doc = recommend(analysis, map=map.value, min_ratio=min_ratio, max_ratio=max_ratio, metric=metric.value,
                        unit=unit.value, exclude_first_last=not keep_first_last, min_evals=min_evals, lr=lr)
        outputs.write({"--out": json.dumps(jsonable(doc), indent=1) + "\n"} if out else {})
        if outputs.stdout is None:
            out_console.print(multipliers_table(doc, source=analysis.source, map=map.value, metric=metric.value,
                                                min_ratio=min_ratio, max_ratio=max_ratio, lr=lr))
            out_console.print(f"every other parameter: multiplier {doc['default_multiplier']:g}"
                              + (f" (lr {lr:g})" if lr else ""), markup=False)


def multipliers_table(doc: dict, *, source: str, map: str, metric: str, min_ratio: float, max_ratio: float,
                      lr: float | None):  # noqa: ANN201 - a rich Table, imported lazily
    """A title line and the tuned groups with alpha, the metric, multiplier and lr; names from the file are
    never markup. The title quotes the ratio range only for maps that use it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from tbdiag.cli.render import fmt
    from tbdiag.tempbalance.maps import USES_RATIOS

    span = f", {min_ratio:g}–{max_ratio:g}" if map in USES_RATIOS else ", mean 1"
    title = Text(f"{source}: TempBalance multipliers ({map} map of {metric}{span})")  # a line of its own: not
    table = Table(header_style="bold")                                                  # wrapped to the table
    for col in ("group", "alpha", metric if metric != "alpha" else "", "multiplier", "lr" if lr else ""):
        if col:
            table.add_column(col, justify="left" if col == "group" else "right")
    for name, e in doc["layers"].items():
        cells = [Text(name), fmt(e["alpha"])]
        if metric != "alpha":
            cells.append(fmt(e["value"]))
        cells.append(f"{e['multiplier']:.3f}")
        if lr:
            cells.append(f"{e['lr']:.4g}")
        table.add_row(*cells)
    return Group(title, table)
