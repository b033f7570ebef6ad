"""Optimizer param groups addressed by unit: decay/no-decay groups, splitting any optimizer's groups by
unit, and keeping schedulers and optimizer checkpoints working across that split.

Group names: a unit's sub-group from the optimizer's first group is named after the unit
(``layers.3.mlp.up``); its sub-groups from later groups get that group's tag (``layers.3.mlp.up:no_decay``):
the group's ``name``, ``no_decay`` for a group without weight decay beside groups with it, or ``g<index>``. Each group carries ``unit``, ``lr_scale`` (what the step applies: the original group's own
``lr_scale`` — timm's layer decay — times the unit's multiplier) and ``tb_base_scale`` (that original scale).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tbdiag.errors import TbdiagError
from tbdiag.allocation.selection import DEFAULT_GROUP, unwrap

OWN_KEYS = ("name", "unit", "lr_scale", "tb_base_scale", "wd_scale", "tb_scale_lr")
SCHEDULER_LISTS = ("lr_lambdas", "min_lrs", "max_lrs", "base_values", "base_momentums", "max_momentums")  # per group
TRANSIENT = ("base_lr_", "base_wd_")  # what the step hooks hold during a step


def is_no_decay(name: str, param: torch.Tensor, module: nn.Module, patterns: Sequence[str]) -> bool:
    """nanoGPT/timm convention: biases, norm gains and other 1-D tensors, and embeddings take no weight decay;
    so does any parameter whose name matches one of ``patterns`` (globs)."""
    if param.ndim <= 1 or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return True
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def param_groups(model: nn.Module, weight_decay: float | None = None, no_decay: Sequence[str] = (),
                 *, decay_embeddings: bool = False) -> list[dict]:
    """Two param groups for building an optimizer: ``decay`` and ``no_decay`` (weight decay 0).

    Args:
        model: the model (wrappers are looked through); only trainable parameters are grouped.
        weight_decay: weight decay of the ``decay`` group; None leaves it to the optimizer's default.
        no_decay: glob patterns of further parameter names without decay (e.g. ``"*.pos_emb"``).
        decay_embeddings: decay embedding matrices too (nanoGPT does; timm does not).
    """
    decay, plain = [], []
    owners: dict[int, list[nn.Module]] = {}  # a tied parameter (embedding = LM head) has several
    for m in unwrap(model).modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(m)
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        embedding = next((m for m in owners[id(p)] if isinstance(m, (nn.Embedding, nn.EmbeddingBag))), None)
        skip = is_no_decay(name, p, embedding or owners[id(p)][0], tuple(no_decay))
        if decay_embeddings and embedding is not None and p.ndim > 1:
            skip = any(fnmatch.fnmatchcase(name, pat) for pat in no_decay)
        (plain if skip else decay).append(p)
    groups = [{"name": "decay", "params": decay}] if decay else []
    if weight_decay is not None and groups:
        groups[0]["weight_decay"] = weight_decay
    if plain:
        groups.append({"name": "no_decay", "params": plain, "weight_decay": 0.0})
    return groups


def _tags(groups: Sequence[Mapping]) -> list[str]:
    decays = [g.get("weight_decay") for g in groups]
    tags = []
    for i, g in enumerate(groups):
        if isinstance(g.get("name"), str) and g["name"]:
            tags.append(g["name"])
        elif decays[i] == 0 and any(d not in (0, None) for d in decays):
            tags.append("no_decay")
        else:
            tags.append(f"g{i}")
    return tags


def split_by_unit(groups: Sequence[Mapping], unit_of: Mapping[int, str]) -> tuple[list[dict], list[int]]:
    """Split every group by the unit of its parameters (``unit_of``: id(param) → unit, else ``default``),
    keeping every setting; returns the new groups and, for each, the index of the group it came from."""
    tags = _tags(groups)
    new, origin, names = [], [], set()
    for i, g in enumerate(groups):
        if g.get("unit") is not None:
            raise TbdiagError("the optimizer's groups are already split by unit (TempBalance applied twice?)")
        by_unit: dict[str, list] = {}
        for p in g["params"]:
            by_unit.setdefault(unit_of.get(id(p), DEFAULT_GROUP), []).append(p)
        settings = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        names_of = dict(zip(map(id, g["params"]), g.get("param_names", ())))  # AdamW(model.named_parameters())
        base_scale = float(g.get("lr_scale", 1.0))
        for unit, params in by_unit.items():
            name = unit if i == 0 else f"{unit}:{tags[i]}"
            while name in names:
                name = f"{name}.{i}"
            names.add(name)
            new.append({**settings, "params": params, "name": name, "unit": unit, "lr_scale": base_scale,
                        "tb_base_scale": base_scale, "wd_scale": 1.0,
                        **({"param_names": [names_of[id(p)] for p in params]} if names_of else {})})
            origin.append(i)
    return new, origin


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    for _ in range(8):  # AcceleratedOptimizer subclasses Optimizer but keeps no state or hooks of its own
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TbdiagError(f"the optimizer is a {type(optimizer).__name__}, not a torch.optim.Optimizer, and wraps none")
    return optimizer


def adopt_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, origin: Sequence[int],
                    n_original: int | None = None) -> None:
    """Make a scheduler built over the original groups drive the split ones: its per-group lists are
    re-indexed by ``origin``, its base rates taken from each group's ``initial_lr`` (SequentialLR and
    ChainedScheduler: every child too; wrappers with ``.scheduler``, as accelerate's, looked through).
    Works for torch's schedulers and timm's (``base_values``). Its ``state_dict`` is then written in the
    original layout and its ``load_state_dict`` takes either layout, like the optimizer's (`OriginalLayout`)."""
    while not hasattr(scheduler, "base_lrs") and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    n_old = n_original if n_original is not None else (max(origin) + 1 if origin else 0)
    for child in getattr(scheduler, "_schedulers", ()) or ():
        adopt_scheduler(child, optimizer, origin, n_old)
    before = {attr: list(v) for attr in (*SCHEDULER_LISTS, "base_lrs", "_last_lr")
              if isinstance(v := getattr(scheduler, attr, None), list) and len(v) == n_old}
    for attr in SCHEDULER_LISTS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == n_old:
            setattr(scheduler, attr, [values[o] for o in origin])
    groups = optimizer.param_groups
    if isinstance(getattr(scheduler, "base_lrs", None), list):
        scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
    if isinstance(getattr(scheduler, "_last_lr", None), list):
        scheduler._last_lr = [g["lr"] for g in groups]
    if len(origin) != n_old and not getattr(scheduler, "_tbdiag_layout", False) and hasattr(scheduler, "state_dict"):
        _keep_original_layout(scheduler, list(origin), n_old, before)


def adopt_after_split(scheduler: Any, optimizer: torch.optim.Optimizer, origin: Sequence[int], n_original: int) -> None:
    """`adopt_scheduler` for a scheduler met after the split: one whose per-group lists still have the original
    length was built before (re-indexed by ``origin``), one already as long as the split was built after."""
    lists = next((v for a in ("base_lrs", "base_values") if isinstance(v := getattr(scheduler, a, None), list)), None)
    n_now = len(optimizer.param_groups)
    if lists is not None and n_now == n_original and list(origin) != list(range(n_now)):
        raise TbdiagError("cannot tell whether this scheduler was built before the optimizer's groups were split "
                          "(the split has as many groups as before); pass it as schedulers=[...] when "
                          "constructing TempBalance")
    if lists is not None and len(lists) != n_now:
        adopt_scheduler(scheduler, optimizer, origin, n_original)
    else:
        adopt_scheduler(scheduler, optimizer, range(len(origin)), len(origin))


def _keep_original_layout(scheduler: Any, origin: list[int], n_old: int, before: dict[str, list]) -> None:
    """Wrap a scheduler's state_dict/load_state_dict (on the instance) to save per-group lists in the
    original layout (each original group's first sub-group; a group without parameters keeps its values
    from ``before`` the split) and to expand them again on load."""
    lists = (*SCHEDULER_LISTS, "base_lrs", "_last_lr")
    save, load = scheduler.state_dict, scheduler.load_state_dict

    def original(key: str, values: list) -> list:
        kept = before.get(key, [None] * n_old)
        return [values[origin.index(j)] if j in origin else kept[j] for j in range(n_old)]

    def convert(state: dict, n_from: int, to: Callable[[str, list], list]) -> dict:
        return {k: (to(k, v) if k in lists and isinstance(v, list) and len(v) == n_from else v)
                for k, v in state.items() if k not in ("state_dict", "load_state_dict", "_tbdiag_layout")}

    scheduler.state_dict = lambda: convert(save(), len(origin), original)
    scheduler.load_state_dict = lambda state: load(convert(state, n_old, lambda k, v: [v[o] for o in origin]))
    scheduler._tbdiag_layout = True


def scale_rates(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step pre-hook: each group steps with ``lr × lr_scale`` (unless a timm scheduler applies it:
    ``tb_scale_lr`` false) and ``weight_decay × wd_scale``. A step that raised never reached `restore_rates`:
    its rates are restored first, so they are never scaled twice."""
    restore_rates(optimizer, args, kwargs)
    for g in optimizer.param_groups:
        if g.get("tb_scale_lr", True):
            g["base_lr_"] = g["lr"]
            g["lr"] = g["lr"] * g.get("lr_scale", 1.0)
        if "weight_decay" in g and g.get("wd_scale", 1.0) != 1.0:
            g["base_wd_"] = g["weight_decay"]
            g["weight_decay"] = g["weight_decay"] * g["wd_scale"]


def restore_rates(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step post-hook: back to the scheduler's ``lr`` and the group's own weight decay between steps."""
    for g in optimizer.param_groups:
        if "base_lr_" in g:
            g["lr"] = g.pop("base_lr_")
        if "base_wd_" in g:
            g["weight_decay"] = g.pop("base_wd_")


class OriginalLayout:
    """The one record of an optimizer's group layout before TempBalance split it (which original group each
    current group came from), and the state-dict hooks that save a split optimizer in that layout and load either
    layout, so checkpoints stay loadable by the same code with or without TempBalance (and whether the
    optimizer is split before or after its state is loaded)."""

    def __init__(self, optimizer: torch.optim.Optimizer, original: Sequence[Mapping], origin: Sequence[int],
                 lr_factor: Callable[[dict], float], *, hooks: bool = True) -> None:
        self.optimizer, self.lr_factor = optimizer, lr_factor
        self.origin = list(origin)  # the original group each current group came from
        self.settings = [{k: v for k, v in g.items() if k != "params"} for g in original]
        self.order = [[id(p) for p in g["params"]] for g in original]  # params of each original group, in order
        if hooks:  # without: an optimizer built over the split groups, whose layout is already the original
            optimizer.register_state_dict_post_hook(self.to_original)
            optimizer.register_load_state_dict_pre_hook(self.from_original)

    @property
    def n_original(self) -> int:
        """How many groups the optimizer had before the split (and were added since)."""
        return len(self.order)

    def add_group(self, original: Mapping, split: Sequence[Mapping]) -> None:
        """An original group added after the split (``add_param_group``), and the sub-groups it became."""
        j = len(self.order)
        self.settings.append({k: v for k, v in original.items() if k != "params"})
        self.order.append([id(p) for g in split for p in g["params"]])
        self.origin += [j] * len(split)

    def _current_ids(self) -> list[int]:
        return [id(p) for g in self.optimizer.param_groups for p in g["params"]]

    def to_original(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        index_now = {pid: i for i, pid in enumerate(self._current_ids())}
        groups_now = state_dict["param_groups"]
        out_groups, state, k = [], {}, 0
        for j, ids in enumerate(self.order):
            if j in self.origin:
                first = groups_now[self.origin.index(j)]
                group = {key: v for key, v in first.items() if key not in (*OWN_KEYS, *TRANSIENT) and key != "params"}
                group["lr"] = first.get("base_lr_", first["lr"]) / self.lr_factor(first)
                if "base_wd_" in first:  # saved while a step was running (or after one raised)
                    group["weight_decay"] = first["base_wd_"]
            else:  # a group that held no parameters
                group = {key: v for key, v in self.settings[j].items() if key not in OWN_KEYS}
            group.update({key: self.settings[j][key] for key in (*OWN_KEYS, "param_names") if key in self.settings[j]})
            group["params"] = list(range(k, k + len(ids)))
            for pid in ids:
                if index_now[pid] in state_dict["state"]:
                    state[k] = state_dict["state"][index_now[pid]]
                k += 1
            out_groups.append(group)
        return {"state": state, "param_groups": out_groups}

    def from_original(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        saved = state_dict["param_groups"]
        if len(saved) != len(self.order) or len(saved) == len(optimizer.param_groups):
            return state_dict  # already this layout (or not ours): torch checks it as usual
        index_then, k = {}, 0
        for ids in self.order:
            for pid in ids:
                index_then[pid] = k
                k += 1
        groups, state, k = [], {}, 0
        for g, o in zip(optimizer.param_groups, self.origin):
            own = {key: g[key] for key in (*OWN_KEYS, "param_names") if key in g}
            group = {**{key: v for key, v in saved[o].items() if key != "params"}, **own}
            group["params"] = list(range(k, k + len(g["params"])))
            for p in g["params"]:
                if index_then[id(p)] in state_dict["state"]:
                    state[k] = state_dict["state"][index_then[id(p)]]
                k += 1
            groups.append(group)
        return {"state": state, "param_groups": groups}
