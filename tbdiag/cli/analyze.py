"""``tbdiag analyze``: every layer's ESD and power-law alpha, as a table, JSON and CSV."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tbdiag.cli.common import (FLAG, KEY_HELP, OVERWRITE_HELP, Estimator, Fit, Outputs, Precision, choices, err_console, out_console,
                               user_errors)

FIT, LAYERS, INPUT, COMPUTE, OUTPUT = "Power-law fit", "Layers", "Input", "Compute", "Output"
COMPARE = "Randomise and compare"


def analyze_command(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="Checkpoint files or folders (safetensors, HF folders, .pt/.bin/.ckpt …).", show_default=False)],
    fit: Annotated[Fit, typer.Option(metavar=choices(Fit), help="Estimator: ks (Clauset et al.; the HT-SR bands are calibrated on it), median (TempBalance's) or peak.", rich_help_panel=FIT)] = Fit.ks,
    xmin_pos: Annotated[float, typer.Option(metavar="X", help="median: xmin is the eigenvalue at index ⌊N / X⌋ (X ≥ 1).", rich_help_panel=FIT)] = 2.0,
    conv_norm: Annotated[float, typer.Option(metavar="X", help="Scale of conv kernel slices (eigenvalues × X, X > 0).", rich_help_panel=FIT)] = 0.5,
    min_evals: Annotated[int, typer.Option(metavar="N", help="Layers with fewer eigenvalues are measured, not fitted (N ≥ 2).", rich_help_panel=FIT)] = 10,
    peak_bins: Annotated[int, typer.Option(metavar="N", help="peak: histogram bins over log10 eigenvalues (1 ≤ N ≤ 1,000,000).", rich_help_panel=FIT)] = 100,
    peak_quirk: Annotated[bool, typer.Option("--peak-quirk", metavar=FLAG, help="peak: reproduce the reference implementation's lower bound.", rich_help_panel=FIT)] = False,
    estimator: Annotated[Estimator, typer.Option(metavar=choices(Estimator), help="ESD of the full matrix, or farms: pooled fixed-aspect-ratio windows.", rich_help_panel=FIT)] = Estimator.full,
    farms_window: Annotated[int, typer.Option(metavar="N", help="farms: window rows (0: half the smaller side).", rich_help_panel=FIT)] = 0,
    farms_windows: Annotated[int, typer.Option(metavar="N", help="farms: windows along each side (N ≥ 1).", rich_help_panel=FIT)] = 4,
    farms_ratio: Annotated[float, typer.Option(metavar="X", help="farms: window columns per row (X > 0).", rich_help_panel=FIT)] = 1.0,
    include: Annotated[Optional[list[str]], typer.Option(metavar="GLOB", help="Only layers matching this glob (repeatable), e.g. 'layer3.*'.", rich_help_panel=LAYERS)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(metavar="GLOB", help="Drop layers matching this glob (repeatable).", rich_help_panel=LAYERS)] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", metavar=FLAG, help="Analyse embedding matrices too.", rich_help_panel=LAYERS)] = False,
    split_qkv: Annotated[bool, typer.Option("--split-qkv", metavar=FLAG, help="Analyse fused q/k/v matrices as three parts.", rich_help_panel=LAYERS)] = False,
    key: Annotated[Optional[str], typer.Option(metavar="NAME", help=KEY_HELP, rich_help_panel=INPUT)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", metavar=FLAG, help="Allow full unpickling and TorchScript: runs code from the file; trusted files only.", rich_help_panel=INPUT)] = False,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=COMPUTE)] = "auto",
    precision: Annotated[Precision, typer.Option(metavar=choices(Precision), help="Eigensolver precision.", rich_help_panel=COMPUTE)] = Precision.float64,
    randomize: Annotated[bool, typer.Option("--randomize", metavar=FLAG, help="Also each layer's ESD with its entries shuffled: rand_distance and correlation traps.", rich_help_panel=COMPARE)] = False,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of --randomize's permutations (with the layer name).", rich_help_panel=COMPARE)] = 0,
    base: Annotated[Optional[Path], typer.Option(metavar="PATH", help="The checkpoint PATH was fine-tuned from: analyse ΔW = W − W_base per layer (for a LoRA adapter folder: W_base + ΔW with --both).", rich_help_panel=COMPARE)] = None,
    both: Annotated[bool, typer.Option("--both", metavar=FLAG, help="With --base: the full weights too (the fine-tuned W, or W_base + ΔW of an adapter).", rich_help_panel=COMPARE)] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help="Write the analysis JSON here ('-' for stdout).", rich_help_panel=OUTPUT)] = None,
    csv_out: Annotated[Optional[str], typer.Option("--csv", metavar="FILE", help="Write one CSV row per layer here ('-' for stdout).", rich_help_panel=OUTPUT)] = None,
    html: Annotated[Optional[str], typer.Option("--html", metavar="FILE", help="Write an HTML report here (a comparison for several paths).", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar=FLAG, help=OVERWRITE_HELP, rich_help_panel=OUTPUT)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar=FLAG, help="No table.", rich_help_panel=OUTPUT)] = False,
    plan: Annotated[bool, typer.Option("--plan", metavar=FLAG, help="Only print what would be analysed and an estimate of the time.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Fit the power-law exponent alpha of every layer's eigenvalue spectrum."""
    from tbdiag.analysis.core import analyze
    from tbdiag.analysis.options import AnalyzeOptions
    from tbdiag.errors import TbdiagError
    from tbdiag.analysis.export import to_csv, to_json

    with user_errors():
        if html == "-":
            raise TbdiagError("--html -: an HTML report goes to a file; name one")
        if both and base is None:
            raise TbdiagError("--both: shows the weights beside their change, which needs --base BASE; add it")
        options = AnalyzeOptions(fit=fit.value, xmin_pos=xmin_pos, conv_norm=conv_norm, min_evals=min_evals,
                                 include=tuple(include or ()), exclude=tuple(exclude or ()),
                                 include_embeddings=embeddings, device=device, precision=precision.value,
                                 peak_bins=peak_bins, peak_lower_bound_quirk=peak_quirk, key=key,
                                 trust_pickle=trust_pickle, split_qkv=split_qkv, estimator=estimator.value,
                                 farms_window=farms_window, farms_per_dim=farms_windows, farms_ratio=farms_ratio,
                                 randomize=randomize, seed=seed)
        outputs = Outputs.check({"--json": json_out, "--csv": csv_out, "--html": html}, [*paths, *([base] if base else [])],
                                overwrite=overwrite)
        if plan:
            from tbdiag.cli.render import plan_table
            from tbdiag.analysis.plan import make_plan

            for p in paths:
                for view in _views(p, base, both):
                    out_console.print(plan_table(make_plan(str(p), options, base=None if base is None else str(base),
                                                           view=view)))
            return
        from tbdiag.analysis.distributed import process_group

        with process_group("gloo") as rank:  # gloo carries the gathered rows; eigenvalues stay on each rank's device
            analyses = [_analyze_with_progress(analyze, str(p), options, keep_spectra=html is not None,
                                               base=None if base is None else str(base), view=view)
                        for p in paths for view in _views(p, base, both)]
        # Everything is computed before anything is written: a failure leaves no partial output.
        if rank != 0:
            return  # under torchrun, rank 0 alone writes and prints
        texts = {}
        if html:
            from tbdiag.report.render import checkpoint_report, comparison_report

            texts["--html"] = checkpoint_report(analyses[0]) if len(analyses) == 1 else \
                comparison_report([(label(a), a) for a in analyses])
        if json_out:
            texts["--json"] = to_json(analyses)
        if csv_out:
            texts["--csv"] = to_csv(analyses)
        outputs.write(texts)  # all files or none, then standard output
        if not quiet:
            console = err_console if outputs.stdout else out_console
            from tbdiag.cli.render import analysis_table, summary_text

            for a in analyses:
                console.print(analysis_table(a))
                console.print(summary_text(a))


def _views(path: Path, base: Path | None, both: bool) -> list[str | None]:
    """The views of one path: its own (weights; ΔW with a base or for an adapter), and with ``both`` the full
    weights too (the fine-tuned W, or W_base + ΔW of an adapter)."""
    from tbdiag.io.checkpoint import adapter_folder

    if base is None:
        return [None]
    return ["delta", "merged" if adapter_folder(path) else "weights"] if both else ["delta"]


def label(a) -> str:  # noqa: ANN001 - an Analysis
    """A short label of an analysis in a comparison: the file name, and what the rows describe."""
    name = Path(a.source).name or a.source
    return name if a.view == "weights" and a.base is None else f"{name} ({a.view})"


def _analyze_with_progress(analyze, path: str, options, keep_spectra: bool, **kwargs):  # noqa: ANN001, ANN202 - CLI glue
    if not sys.stderr.isatty():
        return analyze(path, options, keep_spectra=keep_spectra, **kwargs)
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}% of the work"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(escape(Path(path).name), total=None)

        def step(spec, index: int, total: int, done_cost: float, total_cost: float) -> None:  # noqa: ANN001
            bar.update(task, completed=done_cost, total=total_cost, description=escape(f"{Path(path).name}: {spec.name}"))

        return analyze(path, options, progress=step, keep_spectra=keep_spectra, **kwargs)
