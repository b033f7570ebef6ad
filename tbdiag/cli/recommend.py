"""``tbdiag recommend``: TempBalance learning-rate multipliers from a checkpoint's alphas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tbdiag.cli.common import Outputs, out_console, user_errors

MAP, INPUT = "TempBalance map", "Input"


def recommend_command(
    path: Annotated[Path, typer.Argument(help="Checkpoint file or folder.", show_default=False)],
    map: Annotated[str, typer.Option(help="linear, sqrt, log2, step or sigmoid.", rich_help_panel=MAP)] = "linear",
    min_ratio: Annotated[float, typer.Option(help="Smallest multiplier.", rich_help_panel=MAP)] = 0.5,
    max_ratio: Annotated[float, typer.Option(help="Largest multiplier.", rich_help_panel=MAP)] = 1.5,
    metric: Annotated[str, typer.Option(help="alpha, alpha_weighted or spectral_norm.", rich_help_panel=MAP)] = "alpha",
    unit: Annotated[str, typer.Option(help="layer, or block (one multiplier per transformer block).", rich_help_panel=MAP)] = "layer",
    keep_first_last: Annotated[bool, typer.Option("--keep-first-last", help="Also tune the first and last Conv/Linear.", rich_help_panel=MAP)] = False,
    min_evals: Annotated[int, typer.Option(help="Layers with fewer eigenvalues keep multiplier 1.", rich_help_panel=MAP)] = 50,
    fit: Annotated[str, typer.Option(help="Estimator: median, ks or peak.", rich_help_panel=MAP)] = "median",
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate: also show and write each layer's lr.", rich_help_panel=MAP)] = None,
    key: Annotated[Optional[str], typer.Option(help="Entry of a nested checkpoint holding the weights.", rich_help_panel=INPUT)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow full unpickling (trusted files only).", rich_help_panel=INPUT)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=INPUT)] = "auto",
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the tbdiag.multipliers/v1 JSON here ('-': stdout).")] = None,
) -> None:
    """Turn a checkpoint's per-layer alphas into TempBalance learning-rate multipliers."""
    from tbdiag.analysis import analyze
    from tbdiag.cli.render import fmt
    from tbdiag.export import jsonable
    from tbdiag.tempbalance.recommend import recommend

    with user_errors():
        outputs = Outputs.check({"--out": out}, [path])
        analysis = analyze(str(path), fit=fit, key=key, trust_pickle=trust_pickle, device=device)
        doc = recommend(analysis, map=map, min_ratio=min_ratio, max_ratio=max_ratio, metric=metric, unit=unit,
                        exclude_first_last=not keep_first_last, min_evals=min_evals, lr=lr)
        outputs.write({"--out": json.dumps(jsonable(doc), indent=1) + "\n"} if out else {})
        if outputs.stdout is None:
            from rich.table import Table

            table = Table(title=f"{analysis.source}: TempBalance multipliers ({map} map of {metric}, "
                                f"{min_ratio:g}–{max_ratio:g})", title_justify="left", header_style="bold")
            for col in ("group", "alpha", metric if metric != "alpha" else "", "multiplier", "lr" if lr else ""):
                if col:
                    table.add_column(col, justify="left" if col == "group" else "right")
            for name, e in doc["layers"].items():
                cells = [name, fmt(e["alpha"])]
                if metric != "alpha":
                    cells.append(fmt(e["value"]))
                cells.append(f"{e['multiplier']:.3f}")
                if lr:
                    cells.append(f"{e['lr']:.4g}")
                table.add_row(*cells)
            out_console.print(table)
            out_console.print(f"every other parameter: multiplier {doc['default_multiplier']:g}"
                              + (f" (lr {lr:g})" if lr else ""), markup=False)
