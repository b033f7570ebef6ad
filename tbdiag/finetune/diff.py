"""``diff(A, B)``: how each layer's metrics changed from one analysis to another (``tbdiag.diff/v1``).

Layers are paired by name, with the rule `tbdiag.finetune.delta` follows too: a same-named layer of another shape
is never compared — it is listed in ``changed_shape`` with both shapes (and named in a warning), apart
from the layers only A has (``only_a``) and only B has (``only_b``). For each compared layer the document
holds both values and the change B − A of alpha and the other metrics (`COMPARED`); rows are sorted by the
size of the change of alpha, largest first, then — for layers without two alphas — by the size of the
change of log_norm; layers whose alpha and log_norm both cannot be compared come last, in model order.
Values that cannot be computed are ``nan`` (``null`` in JSON): the randomised metrics of a side analysed
without ``randomize``, for instance (a warning says so).

Both sides must describe the same kind of matrix: weights W (the ``weights`` and ``merged`` views) or
updates ΔW (``delta``: against a base, or a LoRA adapter's s·B·A); and be measured alike (`check_comparable`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from tbdiag import __version__
from tbdiag.analysis.core import Analysis
from tbdiag.finetune.delta import changed_shapes
from tbdiag.errors import TbdiagError

log = logging.getLogger(__name__)

SCHEMA = "tbdiag.diff/v1"
COMPARED = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "mp_softrank", "num_spikes",
           "matrix_entropy", "rand_distance", "num_traps")
RANDOMIZED = ("rand_distance", "num_traps")  # measured only with randomize
# What the rows of each view describe: two analyses are compared only when they describe the same.
MATRIX = {"weights": "weights W", "merged": "weights W", "delta": "updates ΔW"}


class DiffResult(dict):
    """The ``tbdiag.diff/v1`` document: a plain dict (JSON, comparisons and indexing as before) that also
    gives a pandas DataFrame."""

    def to_pandas(self) -> Any:
        """One row per compared layer, in the document's order: name, kind, shape, both statuses, and per
        metric ``<m>_a``, ``<m>_b``, ``<m>_delta``; ``nan`` for JSON nulls (`tbdiag.report.notebook.diff_frame`)."""
        from tbdiag.report.notebook import diff_frame
        return diff_frame(self)


def _value(row: Any, metric: str) -> float:
    v = getattr(row, metric)
    return math.nan if v is None else float(v)


def _key(entry: dict) -> tuple:
    for i, metric in enumerate(("alpha", "log_norm")):
        d = entry["delta"][metric]
        if math.isfinite(d):
            return (i, -abs(d))
    return (2, 0.0)


def diff(a: Analysis, b: Analysis) -> DiffResult:
    """The ``tbdiag.diff/v1`` document of B against A (module docstring; a dict, with ``to_pandas()``);
    floats may be ``nan``.

    Raises:
        TbdiagError: A and B describe different matrices (updates ΔW against weights W), were measured with
            options that change the numbers (`check_comparable`), or have no layer of one shape in common.
    """
    check_comparable(a, b)
    rows_b = {r.name: r for r in b.layers}
    names_a = {r.name for r in a.layers}
    changed = changed_shapes({r.name: r.shape for r in a.layers}, {r.name: r.shape for r in b.layers})
    skip = {name for name, _, _ in changed}
    layers = [_entry(ra, rows_b[ra.name]) for ra in a.layers if ra.name in rows_b and ra.name not in skip]
    if not layers:
        what = f"no layer of one shape in common ({_shapes(changed)})" if changed else (
            f"no layer in common ({a.layers[0].name} … and {b.layers[0].name} …)")
        raise TbdiagError(f"{a.source} and {b.source} have {what}; compare two versions of one model")
    if changed:
        log.warning("%s → %s: not compared, changed shape: %s", a.source, b.source, _shapes(changed))
    if a.options.randomize != b.options.randomize:
        log.warning("only %s was analysed with randomize: the changes of %s are missing",
                    a.source if a.options.randomize else b.source, ", ".join(RANDOMIZED))
    layers.sort(key=_key)  # stable: model order among equals
    return DiffResult({"schema": SCHEMA, "tbdiag_version": __version__, "metrics": list(COMPARED),
                       "sort": "abs_delta_alpha", "a": _side(a), "b": _side(b), "layers": layers,
                       "only_a": [r.name for r in a.layers if r.name not in rows_b],
                       "only_b": [r.name for r in b.layers if r.name not in names_a],
                       "changed_shape": [{"name": name, "shape_a": sa, "shape_b": sb} for name, sa, sb in changed]})


def _entry(ra: Any, rb: Any) -> dict:
    va = {m: _value(ra, m) for m in COMPARED}
    vb = {m: _value(rb, m) for m in COMPARED}
    return {"name": ra.name, "kind": ra.kind, "shape": list(ra.shape), "status": [ra.status, rb.status],
            "a": va, "b": vb, "delta": {m: vb[m] - va[m] for m in COMPARED}}


def _shapes(changed: list) -> str:
    more = f", … (+{len(changed) - 3})" if len(changed) > 3 else ""
    return ", ".join(f"{name} {sa} → {sb}" for name, sa, sb in changed[:3]) + more


def check_comparable(a: Analysis, b: Analysis) -> None:
    """Refuse two analyses whose rows describe different matrices (`MATRIX`), or whose metrics were measured
    differently (another fit, estimator, conv_norm, estimator setting or permutation seed): a change would be
    the view's or the estimator's, not the model's."""
    if MATRIX[a.view] != MATRIX[b.view]:
        raise TbdiagError(f"{a.source} ({a.view} view) describes {MATRIX[a.view]} and {b.source} ({b.view} view) "
                          f"{MATRIX[b.view]}: their metrics are not comparable; compare updates with updates (each "
                          "against its base model) or weights with weights")
    oa, ob = a.options, b.options
    settings = [("fit", oa.fit, ob.fit), ("estimator", oa.estimator, ob.estimator),
                ("conv_norm", oa.conv_norm, ob.conv_norm), ("fit settings", oa.fit_kwargs(), ob.fit_kwargs())]
    if oa.estimator == ob.estimator == "farms":
        settings += [(f, getattr(oa, f), getattr(ob, f)) for f in ("farms_window", "farms_per_dim", "farms_ratio")]
    if oa.randomize and ob.randomize:
        settings.append(("seed", oa.seed, ob.seed))
    for name, va, vb in settings:
        if va != vb:
            what = "randomised metrics" if name == "seed" else "alphas"
            raise TbdiagError(f"{a.source} was analysed with {name} {va} and {b.source} with {vb}: their {what} are "
                              "not comparable; analyse both the same way")


def _side(a: Analysis) -> dict:
    return {"source": a.source, "view": a.view, "base": a.base, "fit": a.options.fit,
            "randomize": a.options.randomize, "alpha_mean": a.summary.get("alpha_mean", math.nan),
            "alpha_std": a.summary.get("alpha_std", math.nan)}  # the spread across layers: did it shrink?
