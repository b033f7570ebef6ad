"""Maps from per-layer metric values (alpha by default) to learning-rate multipliers.

Every map is a pure function of the values of the tuned layers. Layers with a non-finite value (a failed
fit) get multiplier 1 and do not take part in the map of the others.

- ``linear`` (TempBalance's default): m = lo + (v − v_min)/(v_max − v_min)·(hi − lo); all 1 when every
  value is the same (the reference implementation gives every layer ``hi`` there, a bug we do not copy).
- ``sqrt``:  m = n·√v / Σ√v          (mean 1; needs positive values)
- ``log2``:  m = n·log2 v / Σ log2 v  (mean 1; needs values above 1, as alphas are)
- ``step``:  by rank r = 0 … n−1 of v: m = lo + (hi − lo)·r/n
- ``sigmoid`` (the LLM fine-tuning follow-up): d = v − mean(v), m = 10^f with
  f = 2·log10(hi)·(σ(T·d) − ½) for d > 0 and f = 2·log10(1/lo)·(σ(T·d) − ½) otherwise: m is 1 at the mean
  and tends to hi (lo) far above (below) it; T = 10.
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
        raise TbdiagError("map sqrt: needs positive metric values; use --map linear for this metric")
    roots = [math.sqrt(x) for x in v]
    return [len(v) * r / sum(roots) for r in roots]


def _log2(v: list[float], lo: float, hi: float) -> list[float]:
    if min(v) <= 1:
        raise TbdiagError("map log2: needs metric values above 1 (alphas are); use --map linear for this metric")
    logs = [math.log2(x) for x in v]
    return [len(v) * x / sum(logs) for x in logs]


def _step(v: list[float], lo: float, hi: float) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    rank = {i: r for r, i in enumerate(order)}
    return [lo + (hi - lo) * rank[i] / len(v) for i in range(len(v))]


def _sigmoid(v: list[float], lo: float, hi: float, temperature: float = 10.0) -> list[float]:
    mean = sum(v) / len(v)
    out = []
    for x in v:
        d = x - mean
        s = 1 / (1 + math.exp(-temperature * d)) - 0.5
        f = 2 * math.log10(hi) * s if d > 0 else 2 * math.log10(1 / lo) * s
        out.append(10 ** f)
    return out


MAPS: dict[str, Callable[[list[float], float, float], list[float]]] = {
    "linear": _linear, "sqrt": _sqrt, "log2": _log2, "step": _step, "sigmoid": _sigmoid,
}


def multipliers(values: Sequence[float], map_name: str = "linear", min_ratio: float = 0.5,
                max_ratio: float = 1.5) -> list[float]:
    """Learning-rate multipliers for the given metric values (same order), 1 where a value is not finite.

    Raises:
        TbdiagError: an unknown map or a ratio range that is not 0 < min_ratio ≤ max_ratio.
    """
    if map_name not in MAPS:
        raise TbdiagError(f"--map {map_name}: unknown map; use one of {', '.join(MAPS)}")
    if not 0 < min_ratio <= max_ratio:
        raise TbdiagError(f"ratios {min_ratio}–{max_ratio}: need 0 < min_ratio ≤ max_ratio")
    finite = [i for i, x in enumerate(values) if math.isfinite(x)]
    out = [1.0] * len(values)
    if finite:
        for i, m in zip(finite, MAPS[map_name]([float(values[i]) for i in finite], min_ratio, max_ratio)):
            out[i] = m
    return out


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
