"""What the templates show of an analysis, and the Jinja2 environment of the templates (packaged in
``tbdiag/report/templates``). Used by the reports (`tbdiag.report.render`) and by the notebook card
(`tbdiag.report.notebook`), so nothing here imports `tbdiag.analysis.core`: an analysis is read through its
attributes and ``to_dict()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from tbdiag.io.outputs import jsonable
from tbdiag.errors import TbdiagError
from tbdiag.esd.metrics import BANDS_FIT, band_flags
from tbdiag.report import alphas, figures

OPEN_FIRST = 6  # per-layer details open by default in a checkpoint report


def templates_dir() -> Path:
    """The report templates, package data of `tbdiag.report`."""
    folder = Path(__file__).resolve().parent / "templates"
    if not (folder / "base.html.j2").is_file():
        raise TbdiagError("the report templates are missing; reinstall tbdiag (pip install -e .)")
    return folder


def env() -> Environment:
    """The templates' environment: autoescaped (names and paths from files are text, never markup)."""
    return Environment(loader=FileSystemLoader(templates_dir()), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def bands_view(a: Any) -> dict:
    """What the templates need to show the HT-SR bands: the fit, whether the bands apply to it, the flags."""
    flags = band_flags(a.summary, a.options.fit)
    return {"fit": a.options.fit, "bands_fit": BANDS_FIT, "bands": flags is not None,
            "over_trained": flags[0] if flags else [], "under_trained": flags[1] if flags else []}


def summary_view(a: Any) -> dict:
    return {"source": a.source, "summary": jsonable(a.summary), **bands_view(a)}


def analysis_view(a: Any, ident: str, with_esd: bool = True) -> dict:
    """What the templates show of one analysis (JSON-like, ``None`` for nan), its figures as HTML."""
    doc = jsonable(a.to_dict())
    rows = doc["layers"]
    view = {"id": ident, "source": a.source, "format": a.format, "n_params": a.n_params, "options": doc["options"],
            "summary": doc["summary"], "rows": rows, "open_first": OPEN_FIRST, **bands_view(a),
            "randomize": a.options.randomize, "view": a.view, "base": a.base}
    view["alpha_figure"] = Markup(alphas.alpha_by_layer(rows, bands=view["bands"]))
    block = alphas.block_heatmap(rows)
    view["block_figure"] = Markup(block) if block else None
    view["esd_figures"] = ({r["name"]: figures.esd(a.spectra[r["name"]], r, a.rand_spectra.get(r["name"]))
                            for r in rows if r["name"] in a.spectra} if with_esd and a.spectra else {})
    return view
