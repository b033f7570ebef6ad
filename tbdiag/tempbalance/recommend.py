"""From an analysis to TempBalance multipliers (``tbdiag.multipliers/v1``), and back from such a file."""

from __future__ import annotations

import math
from pathlib import Path

from tbdiag.analysis import Analysis
from tbdiag.errors import TbdiagError
from tbdiag.metrics import LayerResult
from tbdiag.tempbalance.balancer import METRICS
from tbdiag.tempbalance.groups import block_of
from tbdiag.tempbalance.maps import unit_means, unit_multipliers

SCHEMA = "tbdiag.multipliers/v1"
TUNABLE_KINDS = ("linear", "conv1d", "conv2d", "conv3d")


def tuned_rows(analysis: Analysis, *, exclude_first_last: bool = True, min_evals: int = 50) -> list[LayerResult]:
    """The rows TempBalance would tune: Conv/Linear in checkpoint order, less first/last and small layers."""
    rows = [r for r in analysis.layers if r.kind in TUNABLE_KINDS]
    if exclude_first_last:
        rows = rows[1:-1]
    return [r for r in rows if r.n_evals >= min_evals]


def recommend(analysis: Analysis, *, map: str = "linear", min_ratio: float = 0.5, max_ratio: float = 1.5,
              metric: str = "alpha", unit: str = "layer", exclude_first_last: bool = True, min_evals: int = 50,
              lr: float | None = None) -> dict:
    """The ``tbdiag.multipliers/v1`` document for an analysis.

    ``layers`` maps each group name (a layer, or a block with ``unit="block"``) to its alpha (the block's
    mean), the chosen metric's value, its multiplier and, when ``lr`` is given, its learning rate.
    """
    if metric not in METRICS:
        raise TbdiagError(f"--metric {metric}: use one of {', '.join(METRICS)}")
    rows = tuned_rows(analysis, exclude_first_last=exclude_first_last, min_evals=min_evals)
    if not rows:
        raise TbdiagError(f"{analysis.source}: no layer to tune (Conv/Linear with ≥ {min_evals} eigenvalues, "
                          "first and last excluded); try --keep-first-last or a lower --min-evals")
    units = [block_of(r.name) if unit == "block" else r.name for r in rows]
    values = [getattr(r, METRICS[metric]) for r in rows]
    mult = unit_multipliers(units, values, map, min_ratio, max_ratio)
    alphas, means = unit_means(units, [r.alpha for r in rows]), unit_means(units, values)
    layers = {}
    for u in mult:
        entry = {"alpha": _or_none(alphas[u]), "value": _or_none(means[u]), "multiplier": mult[u]}
        if unit == "block":
            entry["layers"] = [r.name for r, uu in zip(rows, units) if uu == u]
        if lr is not None:
            entry["lr"] = lr * mult[u]
        layers[u] = entry
    return {"schema": SCHEMA, "source": analysis.source, "metric": metric, "map": map, "min_ratio": min_ratio,
            "max_ratio": max_ratio, "unit": unit, "fit": analysis.options.fit, "lr": lr,
            "layers": layers, "default_multiplier": 1.0}


def _or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def load_multipliers(path: str | Path) -> dict[str, float]:
    """``{group name: multiplier}`` from a ``tbdiag.multipliers/v1`` file.

    Raises:
        TbdiagError: missing file, bad JSON, another schema, or a multiplier that is not a positive number.
    """
    from tbdiag.export import read_json

    doc = read_json(path, "write a multipliers file with tbdiag recommend --out")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise TbdiagError(f"{path}: schema is {doc.get('schema') if isinstance(doc, dict) else None!r}, "
                          f"not {SCHEMA}; write one with tbdiag recommend --out")
    out = {}
    for name, entry in doc.get("layers", {}).items():
        m = entry.get("multiplier") if isinstance(entry, dict) else None
        if not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
            raise TbdiagError(f"{path}: multiplier of {name} is {m!r}, not a positive number")
        out[name] = float(m)
    return out
