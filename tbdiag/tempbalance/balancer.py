"""``TempBalance``: layer-wise learning-rate multipliers from each layer's ESD, for any PyTorch loop.

    opt = torch.optim.AdamW(tbdiag.param_groups(model, weight_decay=0.1), lr=3e-4)   # or any optimizer
    tb = TempBalance(model, opt, every=100, per="update", warmup=500)
    sched = torch.optim.lr_scheduler.LambdaLR(tb.optimizer, schedule)    # built before: schedulers=[sched]
    for step in range(max_steps):
        loss(model, batch).backward(); opt.step(); opt.zero_grad(); sched.step()
        tb.step_update(step + 1)      # counts updates; refits alphas every 100 after the first 500

Each group carries the unit's multiplier in ``lr_scale`` (timm's convention). Between optimizer steps a
group's ``lr`` is whatever the scheduler set; a pre/post hook pair on ``optimizer.step()`` multiplies it by
``lr_scale`` for the duration of the step, so the effective rate is base_lr(t) × lr_scale and no scheduler
is confused. With a timm scheduler, which applies ``lr_scale`` itself, pass ``apply_scale=False``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tbdiag.analysis.measure import measure_shared
from tbdiag.analysis.options import AnalyzeOptions
from tbdiag.errors import TbdiagError
from tbdiag.tempbalance.guards import (check_materialised, check_multipliers, check_scalable, check_schedulers,
                                      held_elsewhere, warn_counter_unused)
from tbdiag.tempbalance.logs import LogMode, log_values
from tbdiag.allocation.maps import METRIC_FIELDS, multipliers, unit_multipliers
from tbdiag.tempbalance.optim import (OriginalLayout, adopt_after_split, adopt_scheduler, inner_optimizer, param_groups,
                                      restore_rates, scale_rates, split_by_unit)
from tbdiag.allocation.selection import (DEFAULT_GROUP, MIN_EVALS, TuneOptions, plan_model, tuned_layers,
                                         unit_of_parameters, units_in_order, unwrap)

log = logging.getLogger(__name__)

PER = ("epoch", "update")
TARGETS = ("lr", "weight_decay", "both")  # what a unit's multiplier scales (AlphaDecay: the weight decay)


def is_factory(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a factory ``groups -> Optimizer`` rather than an optimizer (or a wrapper of one)."""
    return callable(optimizer) and not hasattr(optimizer, "param_groups")


class TempBalance:
    """Temperature balancing: each tuned unit's learning rate follows its layers' heavy-tail exponent.

    Args:
        model: the model (DDP / compile wrappers are looked through).
        optimizer: an optimizer with any grouping (decay/no-decay, per-module lr, timm layer decay; wrappers
            with ``.optimizer`` such as accelerate's are looked through): each group is split by unit and
            keeps its settings. Or a factory ``groups -> Optimizer``, given groups split by unit (and, with
            ``no_decay``, biases/norms/embeddings apart with weight decay 0).
        map, min_ratio, max_ratio: the map from metric to multiplier (`tbdiag.allocation.maps`).
        metric: ``alpha`` (default), ``alpha_weighted`` or ``spectral_norm``.
        every: rebalance every ``every`` epochs or updates (see ``per``); 0 keeps the initial multipliers.
        per: ``epoch`` (counted by `step`) or ``update`` (counted by `step_update`).
        warmup: no rebalance before this many epochs/updates; until then every multiplier is 1 (unless
            ``initial`` is given).
        unit, include_first_last, min_evals, include, exclude, split_qkv: which layers are tuned and their
            groups (`tbdiag.allocation.selection`, the rule `recommend` uses too).
        fit: power-law estimator (``median``, as the paper, ``ks``, ``peak``).
        device: where eigenvalues are computed (``auto``, ``cpu``, ``cuda``…).
        initial: multipliers to start from (``{unit: multiplier}``, e.g. `load_multipliers` of a recommend file).
        apply_scale: let the step hooks apply ``lr_scale`` (False with a timm scheduler, which applies it).
        target: what the multiplier scales: ``lr`` (TempBalance), ``weight_decay`` (AlphaDecay: weight decay
            × m(α), higher alpha → more decay; their default ratios 0.5–1.5, LLaMA runs 0.667–3) or ``both``.
        schedulers: schedulers already built over the optimizer's original groups, adapted to the split.
        no_decay: factory route only: put biases, norms and embeddings in ``:no_decay`` groups (weight decay 0).
        others: other optimizers over the same model (a GAN's discriminator beside its generator): layers whose
            weights they hold and this optimizer does not are neither tuned nor fitted.

    Raises:
        TbdiagError: before anything changes (`tbdiag.tempbalance.guards`): bad options, meta-device weights, no
            layer to tune, a rate that is not a finite number (``lr=None``, Adafactor's ``relative_step=True``), a
            scheduler built over the optimizer and not passed as ``schedulers``.
    """
    from tbdiag.report.notebook import tempbalance_frame as to_pandas  # DataFrame: unit, alpha, multiplier, lr

    def __init__(self, model: nn.Module, optimizer: Any, *, map: str = "linear", min_ratio: float = 0.5,
                 max_ratio: float = 1.5, metric: str = "alpha", every: int = 1, per: str = "epoch", warmup: int = 0,
                 unit: str = "layer", include_first_last: bool = False, min_evals: int = MIN_EVALS,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), split_qkv: bool = False,
                 fit: str = "median", device: str = "auto", initial: Mapping[str, float] | None = None,
                 apply_scale: bool = True, schedulers: Sequence[Any] = (), no_decay: bool = True,
                 target: str = "lr", others: Sequence[Any] = ()) -> None:
        if target not in TARGETS:
            raise TbdiagError(f"target {target!r}: use one of {', '.join(TARGETS)}")
        if metric not in METRIC_FIELDS:
            raise TbdiagError(f"metric {metric!r}: use one of {', '.join(METRIC_FIELDS)}")
        if per not in PER:
            raise TbdiagError(f"per {per!r}: use epoch or update")
        if not (isinstance(every, int) and every >= 0 and isinstance(warmup, int) and warmup >= 0):
            raise TbdiagError(f"every {every!r}, warmup {warmup!r}: must be whole numbers ≥ 0")
        multipliers([], map, min_ratio, max_ratio)  # validates the map and the ratios
        self.map, self.min_ratio, self.max_ratio, self.metric = map, min_ratio, max_ratio, metric
        self.every, self.per, self.warmup, self.apply_scale, self.target = every, per, warmup, apply_scale, target
        self.tune = TuneOptions(unit=unit, include_first_last=include_first_last, min_evals=min_evals,
                                include=tuple(include), exclude=tuple(exclude), split_qkv=split_qkv)
        self.options = AnalyzeOptions(fit=fit, device=device, min_evals=2)  # checks the device, before any change
        check_materialised(unwrap(model))
        specs = plan_model(model, self.tune)
        theirs = held_elsewhere(unwrap(model), None if is_factory(optimizer) else optimizer, others)
        self.layers = [t for t in tuned_layers(specs, self.tune) if t.tensor not in theirs]
        if not self.layers:
            raise TbdiagError(f"no layer to tune in this {type(unwrap(model)).__name__}: TempBalance tunes Linear and "
                              f"Conv layers with ≥ {min_evals} eigenvalues, the input and output layers left out "
                              "(parametrized ones such as weight_norm are not seen, nor layers of other optimizers); "
                              "lower min_evals, keep the first and last layers, or check include/exclude")
        tuned_names = {t.name for t in self.layers}
        self._specs = [s for s in specs if s.name in tuned_names]
        owner = unit_of_parameters(model, self.layers, specs, unit)
        unit_of = {id(p): owner[n] for n, p in unwrap(model).named_parameters() if n in owner}
        if initial is not None:  # checked before the optimizer is touched: a failed construction changes nothing
            check_multipliers(initial, self.units)
        self.optimizer = self._split(model, optimizer, unit_of, schedulers, no_decay)
        self._split_added_groups(unit_of)
        self._mult = {u: 1.0 for u in self._groups}
        self.epoch = self.updates = self.n_balances = 0
        self.last_balance_s = self.total_balance_s = 0.0
        self.values: dict[str, float] = {}
        for g in self.optimizer.param_groups:
            g["tb_scale_lr"] = apply_scale
        self.optimizer.register_step_pre_hook(scale_rates)
        self.optimizer.register_step_post_hook(restore_rates)
        if initial is not None:
            self.set_multipliers(initial)
        elif warmup == 0:
            self.balance()

    def _split(self, model: nn.Module, optimizer: Any, unit_of: dict[int, str], schedulers: Sequence[Any],
               no_decay: bool) -> torch.optim.Optimizer:
        if is_factory(optimizer):
            base = param_groups(model) if no_decay else [{"params": [p for p in unwrap(model).parameters()
                                                                      if p.requires_grad]}]
            groups, _ = split_by_unit(base, unit_of)
            built = inner_optimizer(optimizer(groups))
            check_scalable(built.param_groups, built.defaults, self.target, type(built).__name__)
            self._layout = OriginalLayout(built, built.param_groups, range(len(built.param_groups)), self._lr_factor,
                                          hooks=False)
            return built
        opt = inner_optimizer(optimizer)
        if isinstance(opt, torch.optim.LBFGS):
            raise TbdiagError("LBFGS keeps a single param group, so it cannot step layers at their own rates; use "
                              "another optimizer with TempBalance")
        original = [dict(g) for g in opt.param_groups]
        in_opt = {id(p) for g in original for p in g["params"]}
        missing = [n for n, p in unwrap(model).named_parameters() if p.requires_grad and id(p) not in in_opt]
        if not any(id(p) in in_opt for p in unwrap(model).parameters()):
            raise TbdiagError("the optimizer holds none of this model's parameters; build it over the model "
                              "TempBalance is given (model.parameters(), or its param groups)")
        check_scalable(original, opt.defaults, self.target, type(opt).__name__)
        check_schedulers(optimizer, schedulers)
        if missing:
            log.info("TempBalance: %d trainable parameters are not in the optimizer (e.g. %s)", len(missing), missing[0])
        opt.param_groups, origin = split_by_unit(original, unit_of)
        for scheduler in schedulers:  # a group without parameters has no sub-group: origin says where each came from
            adopt_scheduler(scheduler, opt, origin, len(original))
        self._layout = OriginalLayout(opt, original, origin, self._lr_factor)
        return opt

    def _lr_factor(self, group: dict) -> float:
        """What the saved rate of a group was multiplied by (timm's layer-decay scale when timm applies it)."""
        return 1.0 if self.apply_scale else group["lr_scale"] / group["tb_base_scale"]

    def _split_added_groups(self, unit_of: dict[int, str]) -> None:
        """Groups added later (progressive unfreezing: ``optimizer.add_param_group``) are split by unit as
        well, tagged with their name (or ``g<index>``), and take the current multipliers; a checkpoint in the
        original layout holds them as the groups they were added as."""
        opt, add = self.optimizer, self.optimizer.add_param_group

        def add_param_group(group: dict) -> None:
            j = self._layout.n_original
            check_scalable([group], opt.defaults, self.target, type(opt).__name__, j)
            tag = group.get("name") or f"g{j}"
            names = {g["name"] for g in opt.param_groups}
            new, _ = split_by_unit([group], unit_of)
            for g in new:
                g["name"] = f"{g['unit']}:{tag}"
                while g["name"] in names:
                    g["name"] += f".{j}"
                names.add(g["name"])
                g["tb_scale_lr"] = self.apply_scale
                add(g)
            self._layout.add_group(group, new)
            self._apply(self._mult)

        opt.add_param_group = add_param_group  # type: ignore[method-assign]

    @property
    def _groups(self) -> dict[str, list[dict]]:
        """The optimizer's groups by unit (looked up each time: loading optimizer state replaces them)."""
        out: dict[str, list[dict]] = {}
        for g in self.optimizer.param_groups:
            out.setdefault(g["unit"], []).append(g)
        return out

    @property
    def units(self) -> list[str]:
        """Names of the tuned units, in model order."""
        return units_in_order(self.layers)

    @property
    def multipliers(self) -> dict[str, float]:
        """Current multiplier of every unit (``default`` included, always 1)."""
        return dict(self._mult)

    def effective_lrs(self) -> dict[str, float]:
        """The learning rate each param group steps with, by group name (``lr × lr_scale`` with the hooks)."""
        return {g["name"]: float(g["lr"]) * (g["lr_scale"] if self.apply_scale else 1.0)
                for g in self.optimizer.param_groups}

    def effective_weight_decays(self) -> dict[str, float]:
        """The weight decay each param group steps with, by group name (``weight_decay × wd_scale``)."""
        return {g["name"]: g.get("weight_decay", 0.0) * g["wd_scale"] for g in self.optimizer.param_groups}

    def adopt_scheduler(self, scheduler: Any) -> None:
        """Adapt a scheduler that was built over the optimizer's groups before they were split (as the
        ``schedulers`` argument does); harmless for one built after."""
        adopt_after_split(scheduler, self.optimizer, self._layout.origin, self._layout.n_original)

    def measure(self) -> dict[str, float]:
        """The metric of every tuned layer (``nan`` where a fit failed), shared across ranks under DDP."""
        rows = measure_shared(self._specs, self.options)
        return {row.name: getattr(row, METRIC_FIELDS[self.metric]) for row in rows}

    def balance(self) -> dict[str, float]:
        """Refit every tuned layer now and set each unit's multiplier; returns the multipliers."""
        t0 = time.perf_counter()
        self.values = self.measure()
        result = unit_multipliers([t.unit for t in self.layers], [self.values[t.name] for t in self.layers],
                                  self.map, self.min_ratio, self.max_ratio)
        self._apply(result)
        self.last_balance_s = time.perf_counter() - t0
        self.total_balance_s += self.last_balance_s
        self.n_balances += 1
        log.info("TempBalance: %d units rebalanced from %s in %.3f s", len(result), self.metric, self.last_balance_s)
        return result

    def _due(self, t: int) -> bool:
        return self.every > 0 and t >= max(self.warmup, 1) and t % self.every == 0

    def step(self, epoch: int | None = None) -> bool:
        """End of an epoch: ``epoch`` epochs are done (default: one more than last time). With ``per="epoch"``,
        rebalances when due; returns whether it did."""
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)
        if self.per == "update" and self.updates == 0:
            warn_counter_unused(self)
        if due := (self.per == "epoch" and self._due(self.epoch)):
            self.balance()
        return due

    def step_update(self, num_updates: int | None = None) -> bool:
        """After an optimizer update: ``num_updates`` updates are done (default: one more). With
        ``per="update"``, rebalances when due; returns whether it did."""
        self.updates = self.updates + 1 if num_updates is None else int(num_updates)
        if due := (self.per == "update" and self._due(self.updates)):
            self.balance()
        return due

    def _apply(self, mult: Mapping[str, float]) -> None:
        self._mult.update({unit: float(m) for unit, m in mult.items()})
        for g in self.optimizer.param_groups:
            m = self._mult.get(g["unit"], 1.0)  # a unit first seen in a group added later: 1 until rebalanced
            g["lr_scale"] = g["tb_base_scale"] * (m if self.target in ("lr", "both") else 1.0)
            g["wd_scale"] = m if self.target in ("weight_decay", "both") else 1.0

    def set_multipliers(self, mapping: Mapping[str, float]) -> None:
        """Set the multipliers of named units (e.g. from a ``tbdiag recommend`` file).

        Raises:
            TbdiagError: a name that is no tuned unit of this model, or a multiplier that is not a positive number.
        """
        check_multipliers(mapping, self.units)
        self._apply(mapping)

    def log_values(self, mode: LogMode = "groups") -> dict[str, float]:
        """Flat numbers for a logger, now (`tbdiag.tempbalance.logs`): ``groups`` (default here) the summary and
        ``lr/<group>`` (effective rate), ``<metric>/<unit>``; ``summary`` its 8 keys only."""
        return log_values(self, mode)

    def state_dict(self) -> dict[str, Any]:
        """What `load_state_dict` needs to continue exactly: counters, multipliers, last metric values."""
        return {"epoch": self.epoch, "updates": self.updates, "multipliers": self.multipliers,
                "values": dict(self.values), "n_balances": self.n_balances, "total_balance_s": self.total_balance_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict` output (also that of earlier versions, which counted ``calls``); a state whose
        multipliers do not fit this model changes nothing."""
        check_multipliers(state["multipliers"], self.units)
        self.epoch = int(state.get("epoch", state.get("calls", 0)))
        self.updates = int(state.get("updates", 0))
        self.values = dict(state.get("values", {}))
        self.n_balances = int(state.get("n_balances", 0))
        self.total_balance_s = float(state.get("total_balance_s", 0.0))
        self.set_multipliers({k: v for k, v in state["multipliers"].items() if k != DEFAULT_GROUP})
