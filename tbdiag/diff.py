"""``diff(A, B)``: how each layer's metrics changed from one analysis to another (``tbdiag.diff/v1``).

Layers are paired by name. For each common layer the document holds both values and the change B − A of
alpha and the other metrics (`METRICS`); rows are sorted by the size of the change of alpha, largest
first, then — for layers without two alphas — by the size of the change of log_norm; layers whose alpha
and log_norm both cannot be compared come last, in model order. Values that cannot be computed are
``nan`` (``null`` in JSON).
"""

from __future__ import annotations

import math
from typing import Any

from tbdiag import __version__
from tbdiag.analysis import Analysis
from tbdiag.errors import TbdiagError

SCHEMA = "tbdiag.diff/v1"
METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "mp_softrank", "num_spikes",
           "matrix_entropy", "rand_distance", "num_traps")


def _value(row: Any, metric: str) -> float:
    v = getattr(row, metric)
    return math.nan if v is None else float(v)


def _key(entry: dict) -> tuple:
    for i, metric in enumerate(("alpha", "log_norm")):
        d = entry["delta"][metric]
        if math.isfinite(d):
            return (i, -abs(d))
    return (2, 0.0)


def diff(a: Analysis, b: Analysis) -> dict:
    """The ``tbdiag.diff/v1`` document of B against A (module docstring); floats may be ``nan``.

    Raises:
        TbdiagError: A and B were measured with options that change the numbers (another fit, estimator,
            conv_norm or estimator setting), or have no layer in common.
    """
    check_comparable(a, b)
    rows_b = {r.name: r for r in b.layers}
    names_a = {r.name for r in a.layers}
    if not names_a & set(rows_b):
        raise TbdiagError(f"{a.source} and {b.source} have no layer in common ({next(iter(names_a))} … and "
                          f"{b.layers[0].name} …); compare two versions of one model")
    layers = []
    for ra in a.layers:
        rb = rows_b.get(ra.name)
        if rb is None:
            continue
        va = {m: _value(ra, m) for m in METRICS}
        vb = {m: _value(rb, m) for m in METRICS}
        layers.append({"name": ra.name, "kind": ra.kind, "shape": list(ra.shape),
                       "status": [ra.status, rb.status], "a": va, "b": vb,
                       "delta": {m: vb[m] - va[m] for m in METRICS}})
    layers.sort(key=_key)  # stable: model order among equals
    return {"schema": SCHEMA, "tbdiag_version": __version__, "metrics": list(METRICS), "sort": "abs_delta_alpha",
            "a": _side(a), "b": _side(b), "layers": layers,
            "only_a": [r.name for r in a.layers if r.name not in rows_b],
            "only_b": [r.name for r in b.layers if r.name not in names_a]}


def check_comparable(a: Analysis, b: Analysis) -> None:
    """Refuse two analyses whose alphas were measured differently: a change would be the estimator's."""
    oa, ob = a.options, b.options
    settings = [("fit", oa.fit, ob.fit), ("estimator", oa.estimator, ob.estimator),
                ("conv_norm", oa.conv_norm, ob.conv_norm), ("fit settings", oa.fit_kwargs(), ob.fit_kwargs())]
    if oa.estimator == ob.estimator == "farms":
        settings += [(f, getattr(oa, f), getattr(ob, f)) for f in ("farms_window", "farms_per_dim", "farms_ratio")]
    for name, va, vb in settings:
        if va != vb:
            raise TbdiagError(f"{a.source} was analysed with {name} {va} and {b.source} with {vb}: their alphas are "
                              "not comparable; analyse both the same way")


def _side(a: Analysis) -> dict:
    return {"source": a.source, "view": a.view, "base": a.base, "fit": a.options.fit,
            "alpha_mean": a.summary.get("alpha_mean", math.nan)}
