"""Self-contained HTML reports: one checkpoint, a comparison of several, or training runs.

Inputs are analysis JSON files (``tbdiag analyze --json``), run folders (``tbdiag train --out``) or any
checkpoint ``analyze`` reads; figures come from `tbdiag.report.figures` as inline PNGs, and the page is
rendered with Jinja2 from the package's ``templates/`` folder; the figures of layers name each layer on hover
(`tbdiag.report.hover`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from markupsafe import Markup

from tbdiag import __version__
from tbdiag.analysis.core import Analysis, analyze
from tbdiag.errors import TbdiagError
from tbdiag.esd.metrics import BANDS_FIT
from tbdiag.analysis.export import read_analyses
from tbdiag.io.outputs import check_outputs, write_outputs
from tbdiag.report import alphas, figures, hover
from tbdiag.report.recommended import multipliers_view
from tbdiag.report.views import OPEN_FIRST, analysis_view, env, summary_view, templates_dir  # noqa: F401 - re-exported
from tbdiag.runs.folder import is_run_folder, last_weights, read_config, read_metrics


def _view(a: Analysis, ident: str, with_esd: bool = True) -> dict:
    """What the templates show of one analysis, with the multipliers ``tbdiag recommend`` gives."""
    return {**analysis_view(a, ident, with_esd), **multipliers_view(a)}


def checkpoint_report(a: Analysis) -> str:
    """The HTML report of one analysis."""
    return env().get_template("checkpoint.html.j2").render(a=_view(a, "a0"), version=__version__)


def comparison_report(items: Sequence[tuple[str, Analysis]]) -> str:
    """Several analyses side by side: alphas, a layer × checkpoint heat map, the largest changes, ESDs."""
    if len({label for label, _ in items}) < len(items):  # same file names in different folders
        items = [(f"{label} ({a.source})", a) for label, a in items]
    names = list(dict.fromkeys(r.name for _, a in items for r in a.layers))
    table = {label: {r.name: r.alpha for r in a.layers} for label, a in items}
    matrix = np.array([[table[label].get(n, math.nan) for label, _ in items] for n in names], dtype=float)
    first, last = items[0][0], items[-1][0]
    changes = []
    for i, n in enumerate(names):  # from the first to the last checkpoint where the layer has an alpha
        present = np.flatnonzero(np.isfinite(matrix[i]))
        if len(present) >= 2:
            changes.append({"name": n, "alphas": [None if not np.isfinite(v) else float(v) for v in matrix[i]],
                            "delta": float(matrix[i, present[-1]] - matrix[i, present[0]])})
    changes.sort(key=lambda c: -abs(c["delta"]))
    not_comparable = _incomparable([a for _, a in items])
    only_some = [n for n in names if sum(n in table[label] for label, _ in items) < len(items)]
    overlays = {}
    for n in names:
        spectra = [(label, a.spectra[n]) for label, a in items if n in a.spectra]
        if len(spectra) >= 2:
            overlays[n] = figures.esd_overlay(spectra)
    views = [dict(summary_view(a), label=label) for label, a in items]
    labels = [label for label, _ in items]
    titles = [[f"{n}\n{label}: alpha {hover.fmt(float(matrix[i, j]))}" if n in table[label] else ""
               for j, label in enumerate(labels)] for i, n in enumerate(names)]
    return env().get_template("compare.html.j2").render(
        items=views, bands_fit=BANDS_FIT,
        grouped_figure=Markup(alphas.grouped_alphas(names, [(label, list(matrix[:, j])) for j, label in enumerate(labels)],
                                                    bands=all(v["bands"] for v in views))),
        heatmap_figure=Markup(hover.heatmap(matrix, names, labels, f"alpha, {first} → {last}", titles, "alpha heat map")),
        changes=[] if not_comparable else changes[:25], not_comparable=not_comparable, only_some=only_some,
        overlays=overlays, version=__version__)


def _incomparable(analyses: Sequence[Analysis]) -> str | None:
    """Why the analyses' alphas cannot be differenced (`tbdiag.finetune.diff.check_comparable`, the rule of
    ``tbdiag diff``), or None. Side by side they may still be shown: ΔW beside W (``analyze --both``)."""
    from tbdiag.finetune.diff import check_comparable

    for other in analyses[1:]:
        try:
            check_comparable(analyses[0], other)
        except TbdiagError as exc:
            return str(exc)
    return None


def _alpha_history(label: str, history: list[dict]) -> dict:
    """Alpha of each tuned layer per epoch from metrics.jsonl: the layer × epoch heat map, and alpha_std
    (ddof 0, over the layers with an alpha) and the mean alpha per epoch with their figure; Nones without
    alphas (a method that records none)."""
    layers = list(history[-1].get("layers", {}))
    if not layers or not any(r["layers"].get(n, {}).get("alpha") is not None for r in history for n in layers):
        return {"alpha_heatmap": None, "spread_figure": None, "spread": []}
    matrix = np.array([[(r["layers"].get(n, {}).get("alpha") or math.nan) for r in history] for n in layers])
    epochs = [r["epoch"] for r in history]
    titles = [[f"{n}\nepoch {e}: alpha {hover.fmt(float(matrix[i, j]))}" for j, e in enumerate(epochs)]
              for i, n in enumerate(layers)]
    spread = []
    for j, e in enumerate(epochs):
        col = [float(v) for v in matrix[:, j] if np.isfinite(v)]
        spread.append({"epoch": e, "n": len(col), "alpha_std": statistics.pstdev(col) if col else math.nan,
                       "alpha_mean": statistics.fmean(col) if col else math.nan})
    return {"alpha_heatmap": Markup(hover.heatmap(matrix, layers, [str(e) for e in epochs], f"{label}: alpha per epoch",
                                                  titles, f"alpha heat map of {label}")),
            "spread_figure": Markup(alphas.spread_over_epochs(epochs, [s["alpha_std"] for s in spread],
                                                              [s["alpha_mean"] for s in spread], label)),
            "spread": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()}
                       for s in spread]}


def run_report(folders: Sequence[Path]) -> str:
    """Training runs: curves, learning rates, alpha per layer and its spread over epochs, and the last
    checkpoint's spectra."""
    runs = []
    for i, folder in enumerate(folders):
        config = read_config(folder)
        history = read_metrics(folder)
        if not history:
            raise TbdiagError(f"{folder}: the run has no completed epoch yet (empty metrics.jsonl); report it later")
        label = folder.name if len({f.name for f in folders}) == len(folders) else str(folder)
        weights = last_weights(folder)
        analysis = _view(analyze(str(weights), device="cpu", keep_spectra=True), f"r{i}") if weights else None
        runs.append({"label": label, "config": dataclasses.asdict(config), "history": history,
                     "final": history[-1], "best_acc": _best(r["test_acc"] for r in history),
                     "lr_figure": figures.learning_rates(history), "analysis": analysis,
                     **_alpha_history(label, history)})
    return env().get_template("run.html.j2").render(
        runs=runs, curves_figure=figures.curves([(r["label"], r["history"]) for r in runs]), version=__version__)


def _best(values: Iterable[float]) -> float:
    """The largest finite value (a missing epoch's nan is skipped, not propagated: max() keeps a leading nan)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(finite) if finite else math.nan


def load_inputs(paths: Sequence[str], **analyze_options) -> tuple[str, list]:
    """Sort report inputs: (``runs``, folders) or (``analyses``, [(label, Analysis)]).

    Raises:
        TbdiagError: a missing input, or run folders mixed with checkpoints/analyses.
    """
    runs, analyses = [], []
    for p in paths:
        if not str(p).strip():  # Path("") would be the working folder
            raise TbdiagError("the checkpoint path is empty; name a run folder, a checkpoint or an analysis JSON")
        path = Path(p)
        if is_run_folder(path):
            runs.append(path)
        elif path.is_dir() and not any(path.iterdir()):
            raise TbdiagError(f"{path}: empty folder; pass a training run folder, a checkpoint or an analysis JSON")
        elif path.suffix == ".json" and path.is_file():
            found = read_analyses(path)
            analyses += [(path.stem if len(found) == 1 else f"{path.stem}[{j}]", a) for j, a in enumerate(found)]
        else:
            analyses.append((path.name or str(path), analyze(str(path), keep_spectra=True, **analyze_options)))
    if runs and analyses:
        raise TbdiagError("mixing training runs with checkpoints or analyses: make one report of each")
    return ("runs", runs) if runs else ("analyses", analyses)


def write_report(paths: Sequence[str], out: str | Path, *, overwrite: bool = False, **analyze_options) -> str:
    """Render the report that fits the inputs and write it atomically; returns its kind.

    ``out`` is checked first (`tbdiag.io.outputs.check_outputs`): never an input nor a file of an input folder,
    never an existing checkpoint unless ``overwrite``.
    """
    (target,) = check_outputs([out], paths, overwrite=overwrite)
    kind, items = load_inputs(paths, **analyze_options)
    if kind == "runs":
        html, kind = run_report(items), "run"
    elif len(items) == 1:
        html, kind = checkpoint_report(items[0][1]), "checkpoint"
    else:
        html, kind = comparison_report(items), "comparison"
    write_outputs([(target, html)])
    return kind
