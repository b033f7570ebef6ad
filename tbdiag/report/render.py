"""Self-contained HTML reports: one checkpoint, a comparison of several, or training runs.

Inputs are analysis JSON files (``tbdiag analyze --json``), run folders (``tbdiag train --out``) or any
checkpoint ``analyze`` reads; figures come from `tbdiag.report.figures` as inline PNGs, and the page is
rendered with Jinja2 from the ``templates/`` folder.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from tbdiag import __version__
from tbdiag.analysis.core import Analysis, analyze
from tbdiag.errors import TbdiagError
from tbdiag.esd.metrics import BANDS_FIT, band_flags
from tbdiag.analysis.export import jsonable, read_analyses
from tbdiag.io.outputs import check_outputs, write_outputs
from tbdiag.report import figures
from tbdiag.runs.folder import is_run_folder, last_weights, read_config, read_metrics

OPEN_FIRST = 6  # per-layer details open by default in a checkpoint report


def templates_dir() -> Path:
    """``templates/`` beside the package (source checkout, editable install) or under ``sys.prefix``."""
    for candidate in (Path(__file__).resolve().parents[2] / "templates", Path(sys.prefix) / "share" / "tbdiag" / "templates"):
        if (candidate / "base.html.j2").is_file():
            return candidate
    raise TbdiagError("the report templates are missing; reinstall tbdiag (pip install -e .)")


def _env() -> Environment:
    return Environment(loader=FileSystemLoader(templates_dir()), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _view(a: Analysis, ident: str, with_esd: bool = True) -> dict:
    """What the templates show of one analysis (JSON-like, ``None`` for nan)."""
    from tbdiag.allocation.recommend import recommend

    doc = jsonable(a.to_dict())
    rows = doc["layers"]
    view = {"id": ident, "source": a.source, "format": a.format, "n_params": a.n_params, "options": doc["options"],
            "summary": doc["summary"], "rows": rows, "open_first": OPEN_FIRST, **_bands_view(a),
            "alpha_figure": figures.alpha_by_layer([r["name"] for r in rows], [r["alpha"] for r in rows],
                                                   [r["alpha_err"] for r in rows], bands=a.options.fit == BANDS_FIT)}
    try:
        view["multipliers"], view["multipliers_note"] = jsonable(recommend(a)), ""
    except TbdiagError as exc:
        view["multipliers"], view["multipliers_note"] = None, str(exc)
    view["esd_figures"] = ({r["name"]: figures.esd(a.spectra[r["name"]], r, a.rand_spectra.get(r["name"]))
                            for r in rows if r["name"] in a.spectra} if with_esd and a.spectra else {})
    view["randomize"], view["view"], view["base"] = a.options.randomize, a.view, a.base
    return view


def checkpoint_report(a: Analysis) -> str:
    """The HTML report of one analysis."""
    return _env().get_template("checkpoint.html.j2").render(a=_view(a, "a0"), version=__version__)


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
    only_some = [n for n in names if sum(n in table[label] for label, _ in items) < len(items)]
    overlays = {}
    for n in names:
        spectra = [(label, a.spectra[n]) for label, a in items if n in a.spectra]
        if len(spectra) >= 2:
            overlays[n] = figures.esd_overlay(spectra)
    views = [dict(_summary_view(a), label=label) for label, a in items]
    return _env().get_template("compare.html.j2").render(
        items=views, bands_fit=BANDS_FIT,
        grouped_figure=figures.grouped_alphas(names, [(label, list(matrix[:, j])) for j, (label, _) in enumerate(items)],
                                              bands=all(v["bands"] for v in views)),
        heatmap_figure=figures.heatmap(matrix, names, [label for label, _ in items], f"alpha, {first} → {last}"),
        changes=changes[:25], only_some=only_some, overlays=overlays, version=__version__)


def _summary_view(a: Analysis) -> dict:
    return {"source": a.source, "summary": jsonable(a.summary), **_bands_view(a)}


def _bands_view(a: Analysis) -> dict:
    """What the templates need to show the HT-SR bands: the fit, whether the bands apply to it, the flags."""
    flags = band_flags(a.summary, a.options.fit)
    return {"fit": a.options.fit, "bands_fit": BANDS_FIT, "bands": flags is not None,
            "over_trained": flags[0] if flags else [], "under_trained": flags[1] if flags else []}


def run_report(folders: Sequence[Path]) -> str:
    """Training runs: curves, learning rates, alpha per layer over epochs, and the last checkpoint's spectra."""
    runs = []
    for i, folder in enumerate(folders):
        config = read_config(folder)
        history = read_metrics(folder)
        if not history:
            raise TbdiagError(f"{folder}: the run has no completed epoch yet (empty metrics.jsonl); report it later")
        label = folder.name if len({f.name for f in folders}) == len(folders) else str(folder)
        layers = list(history[-1].get("layers", {}))
        heat = None
        if layers and any(r["layers"].get(n, {}).get("alpha") is not None for r in history for n in layers):
            matrix = np.array([[(r["layers"].get(n, {}).get("alpha") or math.nan) for r in history] for n in layers])
            heat = figures.heatmap(matrix, layers, [str(r["epoch"]) for r in history], f"{label}: alpha per epoch")
        weights = last_weights(folder)
        analysis = _view(analyze(str(weights), device="cpu", keep_spectra=True), f"r{i}") if weights else None
        runs.append({"label": label, "config": dataclasses.asdict(config), "history": history,
                     "final": history[-1], "best_acc": max(r["test_acc"] for r in history),
                     "lr_figure": figures.learning_rates(history), "alpha_heatmap": heat, "analysis": analysis})
    return _env().get_template("run.html.j2").render(
        runs=runs, curves_figure=figures.curves([(r["label"], r["history"]) for r in runs]), version=__version__)


def load_inputs(paths: Sequence[str], **analyze_options) -> tuple[str, list]:
    """Sort report inputs: (``runs``, folders) or (``analyses``, [(label, Analysis)]).

    Raises:
        TbdiagError: a missing input, or run folders mixed with checkpoints/analyses.
    """
    runs, analyses = [], []
    for p in paths:
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
