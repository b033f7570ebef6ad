"""Maps from per-layer metric values (alpha by default) to learning-rate multipliers.

Every map is a pure function of the values of the tuned layers. Layers with a non-finite value (a failed
fit) get multiplier 1 and do not take part in the map of the others. The ratios lo = min_ratio and
hi = max_ratio must be finite with 0 < lo ≤ hi, for every map.

- ``linear`` (TempBalance's default): m = lo + (v − v_min)/(v_max − v_min)·(hi − lo); all 1 when every
  value is the same (the reference implementation gives every layer ``hi`` there, a bug we do not copy).
- ``sqrt``:  m = n·√v / Σ√v          (mean 1; needs positive values)
- ``log2``:  m = n·log2 v / Σ log2 v  (mean 1; needs values above 1, as alphas are)
- ``step``:  by rank r = 0 … n−1 of v: m = lo + (hi − lo)·r/n. Equal values share the average of their
  ranks (values 1, 3, 3, 2 have ranks 0, 2.5, 2.5, 1), so equal values get equal multipliers and ties do
  not move the mean multiplier, lo + (hi − lo)·(n − 1)/(2n).
- ``sigmoid`` (the LLM fine-tuning follow-up): d = v − mean(v), m = 10^f with
  f = 2·log10(hi)·(σ(T·d) − ½) for d > 0 and f = 2·log10(1/lo)·(σ(T·d) − ½) otherwise: m is 1 at the mean
  and tends to hi (lo) far above (below) it; T = 10. σ(x) − ½ is computed as tanh(x/2)/2, which does not
  overflow for values far from the mean (spectral norms).

``sqrt`` and ``log2`` do not use the ratios, as in the reference implementation: their multipliers are
relative sizes with mean 1 (the mean learning rate is kept), neither clipped nor rescaled into
[lo, hi]. Whatever shows multipliers quotes a ratio range only for the maps in `USES_RATIOS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tbdiag.errors import TbdiagError


def _linear(v: list[float], lo: float, hi: float) -> list[float]:
    vmin, vmax = min(v), max(v)
    if vmax == vmin:
        return [1.0] * len(v)
    return [lo + (x - vmin) / (vmax - vmin) * (hi - lo) for x in v]


def _sqrt(v: list[float], lo: float, hi: float) -> list[float]:
    if min(v) <= 0:
        raise TbdiagError("map sqrt: needs positive metric values; use the linear map for this metric")
    roots = [math.sqrt(x) for x in v]
    return [len(v) * r / sum(roots) for r in roots]


def _log2(v: list[float], lo: float, hi: float) -> list[float]:
    if min(v) <= 1:
        raise TbdiagError("map log2: needs metric values above 1 (alphas are); use the linear map for this metric")
    logs = [math.log2(x) for x in v]
    return [len(v) * x / sum(logs) for x in logs]


def _step(v: list[float], lo: float, hi: float) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    rank = [0.0] * len(v)
    start = 0
    while start < len(order):  # a run of equal values shares the average of its ranks
        stop = start
        while stop + 1 < len(order) and v[order[stop + 1]] == v[order[start]]:
            stop += 1
        for i in order[start:stop + 1]:
            rank[i] = (start + stop) / 2
        start = stop + 1
    return [lo + (hi - lo) * r / len(v) for r in rank]


def _sigmoid(v: list[float], lo: float, hi: float, temperature: float = 10.0) -> list[float]:
    mean = sum(v) / len(v)
    out = []
    for x in v:
        d = x - mean
        s = math.tanh(temperature * d / 2) / 2  # σ(T·d) − ½, without overflow
        f = 2 * math.log10(hi) * s if d > 0 else 2 * math.log10(1 / lo) * s
        out.append(10 ** f)
    return out


MAPS: dict[str, Callable[[list[float], float, float], list[float]]] = {
    "linear": _linear, "sqrt": _sqrt, "log2": _log2, "step": _step, "sigmoid": _sigmoid,
}
# The metric a map reads → the field of an analysis row that holds it.
METRIC_FIELDS = {"alpha": "alpha", "alpha_weighted": "alpha_weighted", "spectral_norm": "lambda_max"}
USES_RATIOS = frozenset({"linear", "step", "sigmoid"})  # sqrt and log2 ignore min_ratio and max_ratio


def multipliers(values: Sequence[float], map_name: str = "linear", min_ratio: float = 0.5,
                max_ratio: float = 1.5) -> list[float]:
    """Learning-rate multipliers for the given metric values (same order), 1 where a value is not finite.

    Raises:
        TbdiagError: an unknown map, or ratios that are not finite with 0 < min_ratio ≤ max_ratio.
    """
    if map_name not in MAPS:
        raise TbdiagError(f"map {map_name!r}: unknown map; use one of {', '.join(MAPS)}")
    check_ratios(min_ratio, max_ratio)
    finite = [i for i, x in enumerate(values) if math.isfinite(x)]
    out = [1.0] * len(values)
    if finite:
        for i, m in zip(finite, MAPS[map_name]([float(values[i]) for i in finite], min_ratio, max_ratio)):
            out[i] = m
    return out


def check_ratios(min_ratio: float, max_ratio: float) -> None:
    """Raise a `TbdiagError` unless both ratios are finite and 0 < min_ratio ≤ max_ratio."""
    if not (math.isfinite(min_ratio) and math.isfinite(max_ratio) and 0 < min_ratio <= max_ratio):
        raise TbdiagError(f"ratios min_ratio={min_ratio:g}, max_ratio={max_ratio:g}: need finite numbers with "
                          "0 < min_ratio ≤ max_ratio; e.g. 0.5 and 1.5")


def unit_multipliers(units: Sequence[str], values: Sequence[float], map_name: str = "linear",
                     min_ratio: float = 0.5, max_ratio: float = 1.5) -> dict[str, float]:
    """Multipliers per unit (layer or block) from per-layer values: each unit maps its finite mean."""
    means = unit_means(units, values)
    return dict(zip(means, multipliers(list(means.values()), map_name, min_ratio, max_ratio)))


def unit_means(units: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """Mean of the finite values of each unit, in first-seen order (``nan`` for a unit with none)."""
    per_unit: dict[str, list[float]] = {}
    for unit, v in zip(units, values):
        per_unit.setdefault(unit, []).append(v)
    out = {}
    for unit, vals in per_unit.items():
        finite = [v for v in vals if math.isfinite(v)]
        out[unit] = sum(finite) / len(finite) if finite else math.nan
    return out
