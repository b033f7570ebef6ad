"""``TempBalance``: layer-wise learning-rate multipliers from each layer's ESD, for any PyTorch loop.

    tb = TempBalance(model, lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(tb.optimizer, T_max=epochs)
    for epoch in range(epochs):
        train_one_epoch(model, tb.optimizer)
        sched.step()
        tb.step()            # every `every` calls: refit alphas, remap multipliers

Groups are keyed by layer name and carry their multiplier as ``lr_scale``. Between optimizer steps each
group's ``lr`` is the base schedule's value, whatever scheduler sets it; for the duration of
``optimizer.step()`` a pre/post hook pair multiplies it by ``lr_scale``. So the effective learning rate
of a group is always base_lr(t) × lr_scale. (With a timm-style scheduler that applies ``lr_scale``
itself, pass ``apply_scale=False``.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tbdiag.analysis import AnalyzeOptions, measure_shared
from tbdiag.errors import TbdiagError
from tbdiag.tempbalance.groups import DEFAULT_GROUP, param_groups, select_layers
from tbdiag.tempbalance.maps import multipliers, unit_multipliers

log = logging.getLogger(__name__)

METRICS = {"alpha": "alpha", "alpha_weighted": "alpha_weighted", "spectral_norm": "lambda_max"}


class TempBalance:
    """Temperature balancing: each tuned layer's learning rate follows its heavy-tail exponent.

    Args:
        model: the model (DDP / compile wrappers are looked through).
        optimizer: a factory ``groups -> Optimizer`` (preferred), or an existing optimizer whose param
            groups are split by layer here (its other hyper-parameters are kept).
        map: ``linear`` (default), ``sqrt``, ``log2``, ``step`` or ``sigmoid`` (see `maps`).
        min_ratio: smallest multiplier of the ``linear``/``step``/``sigmoid`` maps.
        max_ratio: largest multiplier.
        metric: ``alpha`` (default), ``alpha_weighted`` or ``spectral_norm``.
        every: rebalance on every ``every``-th call of `step` (an epoch or a number of steps: your choice);
            0 keeps the initial multipliers.
        unit: ``layer`` or ``block`` (one multiplier per transformer block, from its layers' mean metric).
        exclude_first_last: keep the first and last Conv/Linear at the global rate.
        min_evals: keep layers with fewer eigenvalues at the global rate.
        include: only tune layers matching these globs.
        exclude: never tune layers matching these globs.
        fit: power-law estimator (``median``, ``ks``, ``peak``).
        device: where eigenvalues are computed (``auto``, ``cpu``, ``cuda``…).
        initial: multipliers to start from (``{group name: multiplier}``); otherwise balanced at once.
        apply_scale: install the optimizer hooks that apply ``lr_scale`` during each step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | Callable[[list[dict]], torch.optim.Optimizer],
                 *, map: str = "linear", min_ratio: float = 0.5, max_ratio: float = 1.5, metric: str = "alpha",
                 every: int = 1, unit: str = "layer", exclude_first_last: bool = True, min_evals: int = 50,
                 include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), fit: str = "median",
                 device: str = "auto", initial: Mapping[str, float] | None = None, apply_scale: bool = True) -> None:
        if metric not in METRICS:
            raise TbdiagError(f"metric {metric}: use one of {', '.join(METRICS)}")
        if unit not in ("layer", "block"):
            raise TbdiagError(f"unit {unit}: use layer or block")
        if every < 0:
            raise TbdiagError(f"every {every}: must be 0 (never rebalance) or more")
        multipliers([], map, min_ratio, max_ratio)  # validates map and ratios
        self.map, self.min_ratio, self.max_ratio, self.metric, self.every = map, min_ratio, max_ratio, metric, every
        self.options = AnalyzeOptions(fit=fit, device=device, min_evals=2)
        self.layers = select_layers(model, exclude_first_last=exclude_first_last, min_evals=min_evals,
                                    include=tuple(include), exclude=tuple(exclude), unit=unit)
        groups = param_groups(model, self.layers)
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = _regroup(optimizer, groups)
        else:
            self.optimizer = optimizer(groups)
        self._by_name = {g["name"]: g for g in self.optimizer.param_groups if "name" in g}
        self.calls = 0
        self.values: dict[str, float] = {}
        if apply_scale:
            self.optimizer.register_step_pre_hook(_scale_lrs)
            self.optimizer.register_step_post_hook(_restore_lrs)
        if initial is not None:
            self.set_multipliers(initial)
        else:
            self.balance()

    @property
    def units(self) -> list[str]:
        """Names of the tuned param groups, in model order."""
        return list(dict.fromkeys(t.unit for t in self.layers))

    @property
    def multipliers(self) -> dict[str, float]:
        """Current ``lr_scale`` of every named group (``default`` included)."""
        return {name: g["lr_scale"] for name, g in self._by_name.items()}

    def effective_lrs(self) -> dict[str, float]:
        """The learning rate each named group steps with: its base ``lr`` × ``lr_scale``."""
        return {name: g["lr"] * g["lr_scale"] for name, g in self._by_name.items()}

    def measure(self) -> dict[str, float]:
        """The metric of every tuned layer (``nan`` where a fit failed), shared across ranks under DDP."""
        rows = measure_shared([t.spec for t in self.layers], self.options)
        return {t.name: getattr(row, METRICS[self.metric]) for t, row in zip(self.layers, rows)}

    def balance(self) -> dict[str, float]:
        """Refit every tuned layer now and set each group's ``lr_scale``; returns the multipliers."""
        self.values = self.measure()
        result = unit_multipliers([t.unit for t in self.layers], [self.values[t.name] for t in self.layers],
                                  self.map, self.min_ratio, self.max_ratio)
        for unit, m in result.items():
            self._by_name[unit]["lr_scale"] = m
        log.info("TempBalance: %d groups rebalanced (%s)", len(result), self.metric)
        return result

    def step(self) -> None:
        """Count one call; rebalance on every ``every``-th (never when ``every`` is 0)."""
        self.calls += 1
        if self.every and self.calls % self.every == 0:
            self.balance()

    def set_multipliers(self, mapping: Mapping[str, float]) -> None:
        """Set ``lr_scale`` of named groups (e.g. from ``tbdiag recommend``).

        Raises:
            TbdiagError: a name that is no tuned group of this model.
        """
        unknown = [n for n in mapping if n not in self._by_name or n == DEFAULT_GROUP]
        if unknown:
            raise TbdiagError(f"multipliers for {', '.join(unknown[:3])}: no such tuned layer in this model "
                              f"(tuned: {', '.join(self.units[:3])} …); recommend from this model's checkpoint")
        for name, m in mapping.items():
            if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
                raise TbdiagError(f"multiplier of {name}: {m!r} is not a positive number")
            self._by_name[name]["lr_scale"] = float(m)

    def state_dict(self) -> dict[str, Any]:
        """What `load_state_dict` needs to continue exactly: call count, multipliers, last metric values."""
        return {"calls": self.calls, "multipliers": self.multipliers, "values": dict(self.values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict` output."""
        self.calls = int(state["calls"])
        self.values = dict(state["values"])
        for name, m in state["multipliers"].items():
            self._by_name[name]["lr_scale"] = float(m)


def _scale_lrs(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for g in optimizer.param_groups:
        g["base_lr_"] = g["lr"]
        g["lr"] = g["lr"] * g.get("lr_scale", 1.0)


def _restore_lrs(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for g in optimizer.param_groups:
        if "base_lr_" in g:
            g["lr"] = g.pop("base_lr_")


def _regroup(optimizer: torch.optim.Optimizer, groups: list[dict]) -> torch.optim.Optimizer:
    """Split an existing optimizer's param groups into ``groups``, keeping each parameter's settings.

    Raises:
        TbdiagError: a parameter missing from the optimizer, or one group mixing different settings.
    """
    settings: dict[int, dict] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            settings[id(p)] = {k: v for k, v in g.items() if k != "params"}
    new_groups = []
    for group in groups:
        missing = [p for p in group["params"] if id(p) not in settings]
        if missing:
            raise TbdiagError(f"group {group['name']}: a parameter is not in the optimizer; build the optimizer "
                              "over all model parameters, or pass a factory")
        options = [settings[id(p)] for p in group["params"]]
        if any(o != options[0] for o in options):
            raise TbdiagError(f"group {group['name']}: its parameters have different optimizer settings; "
                              "pass a factory `lambda groups: Optimizer(groups, …)` instead")
        new_groups.append({**options[0], "params": group["params"], "name": group["name"], "lr_scale": 1.0})
    optimizer.param_groups = new_groups
    return optimizer
