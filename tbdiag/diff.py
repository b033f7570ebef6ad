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
    """The ``tbdiag.diff/v1`` document of B against A (module docstring); floats may be ``nan``."""
    rows_b = {r.name: r for r in b.layers}
    names_a = {r.name for r in a.layers}
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


def _side(a: Analysis) -> dict:
    return {"source": a.source, "view": a.view, "base": a.base, "fit": a.options.fit,
            "alpha_mean": a.summary.get("alpha_mean", math.nan)}
