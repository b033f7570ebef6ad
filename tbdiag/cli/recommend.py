"""``tbdiag recommend``: TempBalance learning-rate multipliers from a checkpoint's alphas, or another
per-layer allocation from them (weight decay, sparsity, LoRA ranks)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from enum import Enum

from tbdiag.cli.common import (FLAG, KEY_HELP, OVERWRITE_HELP, Fit, MapName, Metric, Outputs, Unit, choices, out_console, require,
                               require_finite, safe, user_errors)

MAP, INPUT, ALLOC = "TempBalance map", "Input", "Other targets"


class Target(str, Enum):
    lr = "lr"
    weight_decay = "weight_decay"
    sparsity = "sparsity"
    lora_rank = "lora_rank"


def recommend_command(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Checkpoint file or folder.", show_default=False)],
    map: Annotated[MapName, typer.Option(metavar=choices(MapName), help="How alphas become multipliers (sqrt and log2 ignore the ratios).", rich_help_panel=MAP)] = MapName.linear,
    min_ratio: Annotated[float, typer.Option(metavar="X", help="Smallest multiplier (finite, > 0).", rich_help_panel=MAP)] = 0.5,
    max_ratio: Annotated[float, typer.Option(metavar="X", help="Largest multiplier (finite, ≥ --min-ratio).", rich_help_panel=MAP)] = 1.5,
    metric: Annotated[Metric, typer.Option(metavar=choices(Metric), help="What the map reads.", rich_help_panel=MAP)] = Metric.alpha,
    unit: Annotated[Unit, typer.Option(metavar=choices(Unit), help="One multiplier per layer, or per transformer block.", rich_help_panel=MAP)] = Unit.layer,
    include_first_last: Annotated[bool, typer.Option("--include-first-last", "--keep-first-last", metavar=FLAG, help="Also tune the first and last Conv/Linear.", rich_help_panel=MAP)] = False,
    min_evals: Annotated[int, typer.Option(metavar="N", help="Layers with fewer eigenvalues keep multiplier 1 (N ≥ 2).", rich_help_panel=MAP)] = 50,
    fit: Annotated[Optional[Fit], typer.Option(metavar=choices(Fit), help="Estimator (default: median, TempBalance's; peak for --target sparsity, AlphaPruning's and prune's).", rich_help_panel=MAP, show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="LR", help="Base learning rate (> 0): also show and write each layer's lr.", rich_help_panel=MAP)] = None,
    key: Annotated[Optional[str], typer.Option(metavar="NAME", help=KEY_HELP, rich_help_panel=INPUT)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", metavar=FLAG, help="Allow full unpickling (trusted files only).", rich_help_panel=INPUT)] = False,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=INPUT)] = "auto",
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="FILE", help="Write the JSON here ('-': stdout): tbdiag.multipliers/v1, or tbdiag.allocation/v1 for other targets.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar=FLAG, help=OVERWRITE_HELP)] = False,
    target: Annotated[Target, typer.Option(metavar=choices(Target), help="lr: TempBalance multipliers; weight_decay: AlphaDecay; sparsity: AlphaPruning; lora_rank: LoRA ranks.", rich_help_panel=ALLOC)] = Target.lr,
    weight_decay: Annotated[Optional[float], typer.Option(metavar="WD", help="weight_decay: the base weight decay, to show each layer's.", rich_help_panel=ALLOC)] = None,
    sparsity: Annotated[float, typer.Option(metavar="S", help="sparsity: mean sparsity over the layers, 0 ≤ S < 1.", rich_help_panel=ALLOC)] = 0.5,
    epsilon: Annotated[float, typer.Option(metavar="E", help="sparsity: spread of the layer ratios, 0 ≤ E < 1.", rich_help_panel=ALLOC)] = 0.3,
    max_sparsity: Annotated[float, typer.Option(metavar="X", help="sparsity: no layer beyond X (S ≤ X < 1), as prune.", rich_help_panel=ALLOC)] = 0.99,
    budget: Annotated[int, typer.Option(metavar="N", help="lora_rank: the sum of the ranks.", rich_help_panel=ALLOC)] = 0,
    beta: Annotated[float, typer.Option(metavar="B", help="lora_rank: rank ∝ alpha^B.", rich_help_panel=ALLOC)] = 1.0,
    r_min: Annotated[int, typer.Option(metavar="R", help="lora_rank: smallest rank.", rich_help_panel=ALLOC)] = 1,
    r_max: Annotated[Optional[int], typer.Option(metavar="R", help="lora_rank: largest rank (default: the budget).", rich_help_panel=ALLOC)] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(metavar="A", help="lora_rank: keep lora_alpha/r constant at A/(mean rank) (alpha_pattern).", rich_help_panel=ALLOC)] = None,
    include: Annotated[Optional[list[str]], typer.Option(metavar="GLOB", help="Only layers matching this glob (repeatable).", rich_help_panel=MAP)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(metavar="GLOB", help="Never layers matching this glob (repeatable).", rich_help_panel=MAP)] = None,
) -> None:
    """Turn a checkpoint's per-layer alphas into TempBalance learning-rate multipliers (or, with --target,
    per-layer weight decay, sparsity or LoRA ranks)."""
    from tbdiag.analysis.core import analyze
    from tbdiag.analysis.export import jsonable
    from tbdiag.allocation.recommend import DEFAULT_FITS, recommend

    with user_errors():
        require_finite(min_ratio, "--min-ratio", "must be a finite number; e.g. 0.5")
        require_finite(max_ratio, "--max-ratio", "must be a finite number; e.g. 1.5")
        require(0 < min_ratio <= max_ratio, "--min-ratio/--max-ratio", f"{min_ratio:g}/{max_ratio:g}",
                "need 0 < min ≤ max; e.g. 0.5 and 1.5")
        if lr is not None:
            require_finite(lr, "--lr", "must be a finite number; e.g. 0.1")
            require(lr > 0, "--lr", lr, "must be positive; e.g. 0.1")
        if target == Target.lora_rank:
            require(budget > 0, "--budget", budget, "lora_rank needs a rank budget; e.g. --budget 256")
        outputs = Outputs.check({"--out": out}, [path], overwrite=overwrite)
        chosen_fit = fit.value if fit is not None else DEFAULT_FITS[target.value]
        analysis = analyze(str(path), fit=chosen_fit, key=key, trust_pickle=trust_pickle, device=device,
                           min_evals=min_evals)  # every selected layer is fitted, as TempBalance and prune fit them
        rule = dict(unit=unit.value, include_first_last=include_first_last, min_evals=min_evals,
                    include=tuple(include or ()), exclude=tuple(exclude or ()))
        if target != Target.lr:
            _allocate(analysis, target, rule, outputs, out, weight_decay=weight_decay, sparsity=sparsity,
                      epsilon=epsilon, max_sparsity=max_sparsity, budget=budget, beta=beta, r_min=r_min, r_max=r_max, lora_alpha=lora_alpha,
                      map=map.value, min_ratio=min_ratio, max_ratio=max_ratio)
            return
        doc = recommend(analysis, map=map.value, min_ratio=min_ratio, max_ratio=max_ratio, metric=metric.value, lr=lr,
                        **rule)
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

    from tbdiag.cli.render import fmt
    from tbdiag.allocation.maps import USES_RATIOS

    span = f", {min_ratio:g}–{max_ratio:g}" if map in USES_RATIOS else ", mean 1"
    title = safe(f"{source}: TempBalance multipliers ({map} map of {metric}{span})")  # a line of its own: not
    table = Table(header_style="bold")                                                  # wrapped to the table
    for col in ("group", "alpha", metric if metric != "alpha" else "", "multiplier", "lr" if lr else ""):
        if col:
            table.add_column(col, justify="left" if col == "group" else "right")
    for name, e in doc["layers"].items():
        cells = [safe(name), fmt(e["alpha"])]
        if metric != "alpha":
            cells.append(fmt(e["value"]))
        cells.append(f"{e['multiplier']:.3f}")
        if lr:
            cells.append(f"{e['lr']:.4g}")
        table.add_row(*cells)
    return Group(title, table)


def _allocate(analysis, target: Target, rule: dict, outputs: Outputs, out: str | None, **p) -> None:  # noqa: ANN001
    """Write and print a ``tbdiag.allocation/v1`` document for a target other than lr."""
    from rich.table import Table

    from tbdiag.cli.render import fmt
    from tbdiag.analysis.export import jsonable
    from tbdiag.allocation.recommend import allocation

    if target == Target.weight_decay:
        params = {k: p[k] for k in ("map", "min_ratio", "max_ratio")}
        if p["weight_decay"] is not None:
            params["weight_decay"] = p["weight_decay"]
    elif target == Target.sparsity:
        params = {"sparsity": p["sparsity"], "epsilon": p["epsilon"], "max_sparsity": p["max_sparsity"]}
    else:
        params = {k: p[k] for k in ("budget", "beta", "r_min", "r_max", "lora_alpha") if p[k] is not None}
    doc = allocation(analysis, target.value, **rule, **params)
    outputs.write({"--out": json.dumps(jsonable(doc), indent=1) + "\n"} if out else {})
    if outputs.stdout is not None:
        return
    key = {"weight_decay": "multiplier", "sparsity": "sparsity", "lora_rank": "rank"}[target.value]
    table = Table(header_style="bold")
    for col in ("group", "alpha", "params", key):
        table.add_column(col, justify="left" if col == "group" else "right")
    for name, g in doc["layers"].items():
        value = g[key] if isinstance(g[key], int) else f"{g[key]:.4f}"
        table.add_row(safe(name), fmt(g["alpha"]), f"{g['n_params']:,}", str(value))
    out_console.print(safe(f"{analysis.source}: {target.value} from alpha ({', '.join(f'{k} {v}' for k, v in params.items())})"))
    out_console.print(table)
