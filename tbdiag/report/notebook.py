"""Analyses, diffs and TempBalance in a notebook: pandas DataFrames, an HTML card, matplotlib figures.

`Analysis.to_pandas`, ``_repr_html_``, `plot` and `plot_esd`, the diff document's ``to_pandas`` and
`TempBalance.to_pandas` call the functions here. pandas is optional (``pip install 'tbdiag[notebook]'``) and
imported only when a DataFrame is asked for; matplotlib and Jinja2 only when a figure or the card is. Every
name from a file is text: escaped in the card's HTML, never mathtext in a figure.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from tbdiag.errors import TbdiagError

CARD_OPEN_UP_TO = 20  # the card's layer table is open up to this many layers, collapsed beyond


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise TbdiagError("to_pandas needs pandas, part of the notebook extra: pip install 'tbdiag[notebook]'") from None
    return pandas


def _nan(value: Any) -> Any:
    """``nan`` where the JSON has ``null`` (a missing count such as num_spikes, or a non-finite float)."""
    return math.nan if value is None else value


def analysis_frame(a: Any) -> Any:
    """A pandas DataFrame of an analysis: one row per layer in model order, one column per field of the row
    (`tbdiag.esd.metrics.LayerResult`: name, kind, shape, n_evals, alpha, …), ``nan`` where the JSON has null."""
    from tbdiag.esd.metrics import LayerResult

    pd = _pandas()
    columns = [f.name for f in dataclasses.fields(LayerResult)]
    return pd.DataFrame([{c: _nan(getattr(r, c)) for c in columns} for r in a.layers], columns=columns)


def diff_frame(doc: dict) -> Any:
    """A pandas DataFrame of a ``tbdiag.diff/v1`` document: one row per compared layer in the document's order
    (largest change of alpha first): name, kind, shape, status_a, status_b, then per metric ``<m>_a``,
    ``<m>_b`` and ``<m>_delta`` (B − A); ``nan`` where the JSON has null."""
    pd = _pandas()
    columns = ["name", "kind", "shape", "status_a", "status_b"]
    columns += [f"{m}_{side}" for m in doc["metrics"] for side in ("a", "b", "delta")]
    rows = []
    for e in doc["layers"]:
        row = {"name": e["name"], "kind": e["kind"], "shape": tuple(e["shape"]), "status_a": e["status"][0],
               "status_b": e["status"][1]}
        for m in doc["metrics"]:
            row.update({f"{m}_a": _nan(e["a"][m]), f"{m}_b": _nan(e["b"][m]), f"{m}_delta": _nan(e["delta"][m])})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def tempbalance_frame(tb: Any) -> Any:
    """A pandas DataFrame of a `TempBalance`'s tuned units in model order: ``unit``, ``layers`` (its layers),
    the metric it balances on (``alpha`` by default: the unit's mean over its layers at the last rebalance,
    ``nan`` before the first), ``multiplier`` and ``lr`` (the rate its parameters step with now, lr ×
    lr_scale; the largest of its param groups' if they set different rates)."""
    from tbdiag.allocation.maps import unit_means

    pd = _pandas()
    means = unit_means([t.unit for t in tb.layers], [tb.values.get(t.name, math.nan) for t in tb.layers])
    rates = tb.effective_lrs()
    by_unit: dict[str, list[float]] = {}
    for g in tb.optimizer.param_groups:
        by_unit.setdefault(g["unit"], []).append(rates[g["name"]])
    multipliers = tb.multipliers
    rows = [{"unit": u, "layers": tuple(t.name for t in tb.layers if t.unit == u), tb.metric: means.get(u, math.nan),
             "multiplier": multipliers.get(u, 1.0), "lr": max(by_unit.get(u, [math.nan]))} for u in tb.units]
    return pd.DataFrame(rows, columns=["unit", "layers", tb.metric, "multiplier", "lr"])


def analysis_card(a: Any) -> str:
    """The notebook card of an analysis: source, summary numbers (alpha_std among them), alpha per layer
    (each layer named on hover; by block and matrix type too for a long model) and the layer table, every
    layer in model order, collapsed beyond `CARD_OPEN_UP_TO` layers."""
    from tbdiag.report.hover import HOVER_CSS
    from tbdiag.report.views import analysis_view, env

    view = analysis_view(a, "card", with_esd=False)
    return env().get_template("card.html.j2").render(a=view, open_table=len(view["rows"]) <= CARD_OPEN_UP_TO,
                                                     hover_css=HOVER_CSS)


def plot(a: Any) -> Any:
    """Alpha per layer in model order with ±alpha_err, over the HT-SR bands for a ks fit (the fit they are
    calibrated on): a matplotlib `Figure` (shown inline in a notebook; ``fig.savefig(...)`` to keep it)."""
    from tbdiag.report.alphas import label_height, draw_alpha
    from tbdiag.report.figures import WIDE_DPI, WIDE_IN, NotebookFigure
    from tbdiag.io.outputs import jsonable
    from tbdiag.report.views import bands_view

    rows = jsonable(a.to_dict())["layers"]
    fig = NotebookFigure(figsize=(WIDE_IN, 3.6 + label_height([r["name"] for r in rows])), dpi=WIDE_DPI,
                         layout="constrained")
    draw_alpha(fig, rows, bands_view(a)["bands"])
    return fig


def plot_esd(a: Any, name: str) -> Any:
    """One layer's ESD with its fitted power law from xmin (log–log, and on a linear scale): a matplotlib
    `Figure`. Needs the eigenvalues: ``analyze(..., keep_spectra=True)``.

    Raises:
        TbdiagError: no layer of that name, or an analysis made without ``keep_spectra=True``.
    """
    from tbdiag.report.figures import NotebookFigure, draw_esd, plain
    from tbdiag.io.outputs import jsonable

    rows = {r["name"]: r for r in jsonable(a.to_dict())["layers"]}
    if name not in rows:
        close = difflib.get_close_matches(name, list(rows), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"its layers are {', '.join(list(rows)[:5])} …"
        raise TbdiagError(f"{a.source}: no layer named {name!r}; {hint}")
    if name not in a.spectra:
        raise TbdiagError(f"{a.source}: the eigenvalues of {name!r} were not kept; analyse with keep_spectra=True "
                          "(tbdiag.analyze(path, keep_spectra=True)) to plot a layer's spectrum")
    fig = NotebookFigure(figsize=(10.0, 3.4), layout="constrained")
    draw_esd(fig, a.spectra[name], rows[name], a.rand_spectra.get(name))
    alpha = rows[name]["alpha"]
    fig.suptitle(plain(f"{name}: alpha {'-' if alpha is None else f'{alpha:.3f}'} ({a.options.fit} fit)"), fontsize=10)
    return fig
