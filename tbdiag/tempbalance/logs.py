"""What `TempBalance` gives a logger: a compact summary by default, per-group numbers on request.

``summary`` (8 keys, whatever the model's size; ``<metric>`` is ``alpha`` by default):

- ``tb/mult_min``, ``tb/mult_max``: the range of the tuned units' multipliers;
- ``tb/<metric>_mean``, ``tb/<metric>_std``: mean and population standard deviation (ddof 0) of the metric
  over the tuned layers whose last fit is finite (``nan`` before the first fit, or when none is finite);
- ``tb/rebalance_s``: how long the last rebalance took; ``tb/n_balances``: rebalances so far;
- ``tb/n_units``: tuned units; ``tb/n_failed``: tuned layers whose last fit gave no finite value.

``groups``: the summary and, per param group, ``lr/<group>`` (its effective rate) and, when the weight decay
is a target, ``wd/<group>``; per unit, ``<metric>/<unit>`` (the mean of its layers' finite values).

Rates and multipliers are those of a `StepRates` when one is given (what an optimizer step used, as a
step hook records it), else the current ones (what the next step will use).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from tbdiag.errors import TbdiagError

TempBalance = Any  # a `tbdiag.tempbalance.balancer.TempBalance` (not imported: the balancer imports this module)

LogMode = Literal["summary", "groups"]
LOG_MODES: tuple[str, ...] = get_args(LogMode)


@dataclass(frozen=True)
class StepRates:
    """What one optimizer step used: each group's effective rate and weight decay, each unit's multiplier."""

    lrs: Mapping[str, float]
    weight_decays: Mapping[str, float]
    multipliers: Mapping[str, float]


def step_rates(tb: TempBalance) -> StepRates:
    """The rates and multipliers the current (or just finished) step uses."""
    return StepRates(tb.effective_lrs(), tb.effective_weight_decays() if tb.target != "lr" else {}, tb.multipliers)


def check_log_mode(mode: str, where: str) -> None:
    """Raise a `TbdiagError` unless ``mode`` is one of `LOG_MODES`."""
    if mode not in LOG_MODES:
        raise TbdiagError(f"{where}: log={mode!r}; use one of {', '.join(map(repr, LOG_MODES))}")


def summary_values(tb: TempBalance, multipliers: Mapping[str, float]) -> dict[str, float]:
    """The 8 summary keys (module docstring) of ``tb`` with these multipliers."""
    mult = [float(multipliers.get(u, 1.0)) for u in tb.units]
    fitted = [tb.values[t.name] for t in tb.layers if t.name in tb.values]
    finite = [float(v) for v in fitted if math.isfinite(v)]
    return {"tb/mult_min": min(mult), "tb/mult_max": max(mult),
            f"tb/{tb.metric}_mean": statistics.fmean(finite) if finite else math.nan,
            f"tb/{tb.metric}_std": statistics.pstdev(finite) if finite else math.nan,
            "tb/rebalance_s": tb.last_balance_s, "tb/n_balances": float(tb.n_balances),
            "tb/n_units": float(len(tb.units)), "tb/n_failed": float(len(fitted) - len(finite))}


def group_values(tb: TempBalance, used: StepRates) -> dict[str, float]:
    """``lr/<group>``, ``wd/<group>`` (weight-decay targets) and ``<metric>/<unit>``."""
    out = {f"lr/{name}": float(lr) for name, lr in used.lrs.items()}
    out.update({f"wd/{name}": float(wd) for name, wd in used.weight_decays.items()})
    per_unit: dict[str, list[float]] = {}
    for t in tb.layers:
        v = tb.values.get(t.name, math.nan)
        if math.isfinite(v):
            per_unit.setdefault(t.unit, []).append(v)
    out.update({f"{tb.metric}/{u}": sum(v) / len(v) for u, v in per_unit.items()})
    return out


def log_values(tb: TempBalance, mode: LogMode = "summary", used: StepRates | None = None) -> dict[str, float]:
    """Flat numbers for a logger (module docstring); ``used``: what the step a log row describes used."""
    check_log_mode(mode, "TempBalance.log_values")
    used = used if used is not None else step_rates(tb)
    out = summary_values(tb, used.multipliers)
    if mode == "groups":
        out.update(group_values(tb, used))
    return out
