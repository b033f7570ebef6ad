"""What `TempBalance` refuses before it changes anything: weights that are not there, rates it cannot scale,
a scheduler it was not told about, and layers that another optimizer trains.

Every check raises a one-line `TbdiagError` (what, where, what to do) and leaves the model, the optimizer
and its groups untouched, so the same objects can be retried once the cause is fixed.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tbdiag.errors import TbdiagError
from tbdiag.tempbalance.optim import inner_optimizer
from tbdiag.allocation.selection import DEFAULT_GROUP
from tbdiag.io.tensors import clean_name

log = logging.getLogger(__name__)


def check_materialised(model: nn.Module) -> None:
    """Refuse a model whose parameters are on the meta device (shapes without values: nothing to fit)."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise TbdiagError(f"TempBalance: {len(meta)} parameters of this {type(model).__name__} are on the meta device "
                          f"(e.g. {meta[0]}), so they hold no values to fit; materialise the weights first "
                          "(load them, or model.to_empty(device=...) and initialise) and then build TempBalance")


def check_multipliers(mapping: Mapping[str, float], units: Sequence[str]) -> None:
    """Multipliers by name of a tuned unit (one whose parameters are frozen has no group but is tuned) or
    ``default`` at 1, each a positive number."""
    known = set(units) | {DEFAULT_GROUP}
    unknown = [n for n in mapping if n not in known or (n == DEFAULT_GROUP and mapping[n] != 1.0)]
    if unknown:
        raise TbdiagError(f"multipliers for {', '.join(unknown[:3])}: no such tuned unit in this model "
                          f"(tuned: {', '.join(units[:3])} …); recommend from this model's checkpoint "
                          "with the same unit and layer options")
    for name, m in mapping.items():
        if isinstance(m, bool) or not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
            raise TbdiagError(f"multiplier of {name}: {m!r} is not a positive number")


def rate_value(x: Any) -> float | None:
    """The rate ``x`` as a float when it is one TempBalance can scale (a finite number ≥ 0, or a 0-d floating
    tensor holding one, which torch's optimizers accept), else None."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 0 or not x.is_floating_point() or x.is_meta:
            return None
        x = float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        return None
    return float(x)


def check_scalable(groups: Sequence[Mapping], defaults: Mapping, target: str, optimizer: str, first: int = 0) -> None:
    """Refuse groups whose learning rate (``target`` ``lr``/``both``) or weight decay (``weight_decay``/``both``)
    TempBalance cannot scale; ``defaults`` fill what a group leaves out (``add_param_group``), ``first`` is the
    index of the first group (one added later)."""
    for i, group in enumerate(groups, start=first):
        g = {**defaults, **group}
        lr = g.get("lr")
        if target != "weight_decay" and (g.get("relative_step") or rate_value(lr) is None):
            why = "computed by the optimizer itself (relative_step=True)" if g.get("relative_step") else "not a number"
            raise TbdiagError(f"TempBalance: param group {i} of {optimizer} has lr={_shown(lr)}, {why}, so there is no "
                              "rate to scale; give every group a fixed finite lr (e.g. Adafactor(..., "
                              "relative_step=False, lr=1e-3)) or train without TempBalance")
        if target != "lr" and rate_value(g.get("weight_decay", 0.0)) is None:
            raise TbdiagError(f"TempBalance: param group {i} of {optimizer} has weight_decay="
                              f"{_shown(g.get('weight_decay'))}, not a finite number ≥ 0 to scale; set a numeric "
                              "weight_decay")
    if target != "lr" and groups and not any(rate_value({**defaults, **g}.get("weight_decay", 0.0)) for g in groups):
        raise TbdiagError(f"TempBalance: target={target!r} scales weight decay, but every group of {optimizer} has "
                          "weight_decay 0, so it would change nothing; give the optimizer a weight decay")


def _shown(x: Any) -> str:
    return f"tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) and x.ndim else repr(x)


def check_schedulers(optimizer: Any, schedulers: Sequence[Any]) -> None:
    """Refuse an optimizer (as given: wrappers such as accelerate's included) over which a live scheduler was
    built and not passed (`built_over`): after the split it would fail inside torch (its per-group lists no
    longer match the groups) or undo the rates. Groups that carry ``initial_lr`` with no scheduler alive (a
    loaded optimizer state) are only reported."""
    passed = _with_children(schedulers)
    names = [type(s).__name__ for s in built_over(optimizer) if id(s) not in passed]  # names: no object kept alive
    inner = inner_optimizer(optimizer)
    if names:
        raise TbdiagError(f"TempBalance: a learning-rate scheduler ({', '.join(names)}) was built over this "
                          f"{type(inner).__name__} before TempBalance and was not passed to it; pass it as "
                          "schedulers=[...] so it follows the split groups, or build it after TempBalance")
    if not schedulers and any("initial_lr" in g for g in inner.param_groups):
        log.warning("TempBalance: the optimizer's groups carry initial_lr (a loaded state, or a scheduler built "
                    "before); pass any scheduler built over them as schedulers=[...]")


def built_over(optimizer: Any) -> list[Any]:
    """The live schedulers over this optimizer, any optimizer it wraps (``.optimizer``) or any optimizer that
    wraps it (accelerate's): torch's (ReduceLROnPlateau too, which leaves no mark on the optimizer) and
    timm's (a ``base_values`` list), found among the objects that refer to them. One scan of the heap; again,
    after a collection, when one is found (a scheduler that is garbage steps nothing)."""
    levels = [optimizer]
    while isinstance(getattr(levels[-1], "optimizer", None), torch.optim.Optimizer) and len(levels) < 8:
        levels.append(levels[-1].optimizer)
    found = _schedulers_referring(levels)
    if found:
        del found
        gc.collect()
        found = _schedulers_referring(levels)
    return found


def _schedulers_referring(levels: list[Any]) -> list[Any]:
    found: dict[int, Any] = {}
    for _ in range(8):  # each round adds the optimizers that wrap one met so far
        ids = {id(o) for o in levels}
        holders = [o for o in _holders(levels) if id(_attribute(o, "optimizer")) in ids]
        found.update((id(o), o) for o in holders if _is_scheduler(o))
        wrappers = [o for o in holders if isinstance(o, torch.optim.Optimizer) and id(o) not in ids]
        if not wrappers:
            break
        levels = levels + wrappers
    return list(found.values())


def _holders(targets: list[Any]) -> list[Any]:
    """The objects that refer to any of ``targets``: each instance, found itself or through its ``__dict__``."""
    refs = gc.get_referrers(*targets)
    dicts = [r for r in refs if isinstance(r, dict)]
    ids = {id(d) for d in dicts}
    owners = [o for o in gc.get_referrers(*dicts) if id(_attribute(o, "__dict__")) in ids] if dicts else []
    return [r for r in refs if not isinstance(r, dict)] + owners


def _attribute(o: Any, name: str) -> Any:
    try:  # any object may refer to the optimizer: one whose attributes raise is not a scheduler
        return object.__getattribute__(o, name)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a property of any user class may raise anything
        return None


def _is_scheduler(o: Any) -> bool:
    return isinstance(o, SCHEDULER_TYPES) or isinstance(_attribute(o, "base_values"), list)


SCHEDULER_TYPES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _with_children(schedulers: Iterable[Any]) -> set[int]:
    """Ids of the schedulers passed and of those they drive (SequentialLR's, ChainedScheduler's, a wrapper's)."""
    ids: set[int] = set()
    todo = list(schedulers)
    while todo:
        s = todo.pop()
        if id(s) not in ids:
            ids.add(id(s))
            todo += [*(getattr(s, "_schedulers", None) or ()), *([s.scheduler] if hasattr(s, "scheduler") else [])]
    return ids


def held_elsewhere(model: nn.Module, optimizer: Any, others: Iterable[Any]) -> set[str]:
    """Names (as layers name their tensors) of the model's parameters that one of ``others`` holds and
    ``optimizer`` (None: a factory, not built yet) does not: another optimizer's layers, never tuned."""
    def ids(opt: Any) -> set[int]:
        return {id(p) for g in inner_optimizer(opt).param_groups for p in g["params"]}

    others = list(others)
    if not others:
        return set()
    own = ids(optimizer) if optimizer is not None else set()
    theirs = set().union(*(ids(o) for o in others)) - own
    return {clean_name(n) for n, p in model.named_parameters() if id(p) in theirs}


def warn_counter_unused(tb: Any) -> None:
    """Once per balancer: ``per="update"`` rebalances on `step_update`, which was never called, while `step`
    (timm's epoch counter) only counts epochs — a loop calling `step` alone would never rebalance."""
    if not getattr(tb, "_warned_counter", False):
        log.warning("TempBalance(per='update') rebalances on step_update(num_updates), which has not been called; "
                    "step(epoch) only counts epochs: call step_update after each optimizer update, or use "
                    "per='epoch'")
        tb._warned_counter = True
