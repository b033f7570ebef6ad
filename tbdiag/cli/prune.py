"""``tbdiag prune``: magnitude pruning with per-layer sparsities from alpha (AlphaPruning), or uniform."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from tbdiag.allocation.allocators import DEFAULT_FITS
from tbdiag.cli.common import (FLAG, KEY_HELP, OVERWRITE_HELP, STDOUT, Fit, Unit, choices, err_console, out_console, require, require_finite,
                               safe, user_errors)

ALLOC, LAYERS, FIT, INPUT, OUTPUT = "Allocation", "Layers", "Alpha fit", "Input", "Output"


class Allocation(str, Enum):
    alpha = "alpha"
    uniform = "uniform"


def prune_command(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Checkpoint file or folder.", show_default=False)],
    sparsity: Annotated[float, typer.Option("--sparsity", metavar="S", help="Mean sparsity S of the pruned layers, weighted by their sizes (0 ≤ S < 1).", show_default=False, rich_help_panel=ALLOC)],
    allocation: Annotated[Allocation, typer.Option(metavar=choices(Allocation), help="Per-layer sparsities from alpha (AlphaPruning: higher alpha, more pruned), or S everywhere.", rich_help_panel=ALLOC)] = Allocation.alpha,
    epsilon: Annotated[float, typer.Option(metavar="E", help="alpha: ratios spread over [1 − E, 1 + E] before rescaling to S (0 ≤ E < 1).", rich_help_panel=ALLOC)] = 0.3,
    max_sparsity: Annotated[float, typer.Option(metavar="X", help="No layer is pruned beyond X (S ≤ X < 1).", rich_help_panel=ALLOC)] = 0.99,
    unit: Annotated[Unit, typer.Option(metavar=choices(Unit), help="A sparsity per layer, or per transformer block (its mean alpha).", rich_help_panel=ALLOC)] = Unit.layer,
    include_first_last: Annotated[bool, typer.Option("--include-first-last", "--prune-first-last", metavar=FLAG, help="Also prune the input and output layers (outside numbered blocks: LM head, stem), which AlphaPruning leaves dense.", rich_help_panel=LAYERS)] = False,
    min_evals: Annotated[int, typer.Option(metavar="N", help="Layers with fewer eigenvalues stay dense (N ≥ 2).", rich_help_panel=LAYERS)] = 50,
    fit: Annotated[Fit, typer.Option(metavar=choices(Fit), help="Estimator of alpha (AlphaPruning fits peak).", rich_help_panel=FIT)] = Fit(DEFAULT_FITS["sparsity"]),
    peak_quirk: Annotated[bool, typer.Option("--peak-quirk", metavar=FLAG, help="peak: reproduce the reference implementation's lower bound.", rich_help_panel=FIT)] = False,
    key: Annotated[Optional[str], typer.Option(metavar="NAME", help=KEY_HELP, rich_help_panel=INPUT)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", metavar=FLAG, help="Allow full unpickling (trusted files only).", rich_help_panel=INPUT)] = False,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N (for the alphas).", rich_help_panel=INPUT)] = "auto",
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="NEW", help="Write the pruned checkpoint here: a safetensors file, or for a model folder a new folder with its config and tokenizer files (a single-file folder may also go to a .safetensors file).", rich_help_panel=OUTPUT)] = None,
    allocation_json: Annotated[Optional[str], typer.Option("--allocation-json", metavar="FILE", help="Write the per-layer sparsities (tbdiag.allocation/v1) here ('-': stdout), e.g. for Wanda or SparseGPT.", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar=FLAG, help=OVERWRITE_HELP, rich_help_panel=OUTPUT)] = False,
    plan_only: Annotated[bool, typer.Option("--plan-only", metavar=FLAG, help="Only show the allocation; write no weights.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Prune the smallest-magnitude weights of each layer to a sparsity allocated from its alpha (or uniform)."""
    from tbdiag.errors import TbdiagError
    from tbdiag.pruning.core import prune

    with user_errors():
        require_finite(sparsity, "--sparsity", "must be a finite number; e.g. 0.7")
        require(0 <= sparsity < 1, "--sparsity", sparsity, "must be at least 0 and below 1; e.g. 0.7")
        require_finite(epsilon, "--epsilon", "must be a finite number; e.g. 0.3")
        require(0 <= epsilon < 1, "--epsilon", epsilon, "must be at least 0 and below 1; e.g. 0.3 (0: uniform)")
        require(sparsity <= max_sparsity < 1, "--max-sparsity", max_sparsity,
                f"must lie between --sparsity {sparsity:g} and 1; e.g. 0.99")
        if plan_only and out is not None:
            raise TbdiagError("--plan-only with --out: --plan-only writes no weights; drop one of them")
        if out is None and allocation_json is None and not plan_only:
            raise TbdiagError("--out: missing, nothing to write; give --out NEW for the pruned checkpoint, "
                              "--allocation-json FILE for the allocation alone, or --plan-only to show it")
        result = prune(path, out, sparsity=sparsity, allocation=allocation.value, epsilon=epsilon,
                       max_sparsity=max_sparsity, unit=unit.value, include_first_last=include_first_last,
                       min_evals=min_evals, fit=fit.value, peak_lower_bound_quirk=peak_quirk,
                       allocation_json=None if allocation_json == STDOUT else allocation_json, key=key,
                       trust_pickle=trust_pickle, device=device, overwrite=overwrite)
        console = out_console
        if allocation_json == STDOUT:
            typer.echo(result.to_json(), nl=False)
            console = err_console
        console.print(allocation_table(result))
        console.print(f"realised mean sparsity {result.realised_mean:.6f} (target {sparsity:g}) over "
                      f"{len(result.layers)} layers: {result.n_pruned:,} of {result.n_params:,} weights are zero"
                      + (f" ({result.n_zero_input:,} were already)" if result.n_zero_input else ""),
                      markup=False)
        if result.copied:
            console.print(safe(f"copied from the input folder: {', '.join(result.copied)}"), soft_wrap=True)
        if result.fallbacks:
            console.print(safe(f"alpha not finite for {len(result.fallbacks)} layers: "
                               f"{'; '.join(result.fallback_notes())}"), markup=False, soft_wrap=True)
        if result.left_out:
            console.print(safe(f"left out: {', '.join(f'{path} ({why})' for path, why in result.left_out)}"),
                          markup=False, soft_wrap=True)
        for what, where in (("pruned checkpoint", out), ("allocation", allocation_json)):
            if where is not None and where != STDOUT:
                console.print(safe(f"wrote {what}: {where}"), soft_wrap=True)


def allocation_table(result):  # noqa: ANN001, ANN201 - a PruneResult in, a rich renderable out (imported lazily)
    """A title line naming the allocation, then a row per pruned layer; names from the file are never markup."""
    from rich.console import Group
    from rich.table import Table

    from tbdiag.cli.render import fmt

    o = result.options
    how = (f"alpha allocation (ε {o.epsilon:g}, {o.fit} fit, unit {o.unit})" if o.allocation == "alpha"
           else "uniform allocation")
    title = safe(f"{result.source}: magnitude pruning to mean sparsity {o.sparsity:g}, {how}")
    table = Table(header_style="bold")
    block = o.unit == "block"
    for col in ("layer", "block" if block else "", "alpha", "sparsity", "zeroed", "of"):
        if col:
            table.add_column(col, justify="left" if col in ("layer", "block") else "right")
    for x in result.layers:
        cells = [safe(x.name)] + ([safe(x.unit)] if block else [])
        table.add_row(*cells, fmt(x.unit_alpha), f"{x.sparsity:.4f}", f"{x.n_pruned:,}", f"{x.n_params:,}")
    return Group(title, table)
