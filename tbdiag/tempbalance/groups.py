"""Which layers TempBalance tunes, and optimizer param groups addressed by layer (or block) name.

Tuned: every Conv1d/2d/3d and Linear, in module order, except the first and the last and those with
fewer than ``min_evals`` eigenvalues. Each tuned layer's parameters (weight and bias) and those of the
norm layer that directly follows it form one group named after the layer; with ``unit="block"`` the
layers of one transformer block (``model.layers.3.*``) share a group named after the block. Every other
trainable parameter is in the group ``default``. Each group carries ``lr_scale``, its multiplier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from tbdiag.checkpoint import TensorRef
from tbdiag.layers import LayerSpec, kind_of_module, selected

TUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
         *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
DEFAULT_GROUP = "default"
BLOCK = re.compile(r"^(.*?\.\d+)\.")  # the name up to its first numeric component: model.layers.3


@dataclass(frozen=True)
class TunedLayer:
    """A layer whose learning rate TempBalance sets; ``unit`` is the name of its param group."""

    name: str
    unit: str
    spec: LayerSpec = field(repr=False, compare=False)
    module: nn.Module = field(repr=False, compare=False)


def block_of(name: str) -> str:
    """The block a layer belongs to: ``model.layers.3.mlp.up`` → ``model.layers.3`` (itself if none)."""
    found = BLOCK.match(name)
    return found.group(1) if found else name


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def tunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv/Linear module, in module order."""
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, TUNABLE)]


def select_layers(model: nn.Module, *, exclude_first_last: bool = True, min_evals: int = 50,
                  include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), unit: str = "layer") -> list[TunedLayer]:
    """The layers TempBalance tunes, in module order.

    Args:
        model: the model (wrappers are looked through).
        exclude_first_last: leave the first and the last Conv/Linear at the global rate (the reference does).
        min_evals: leave layers with fewer eigenvalues at the global rate.
        include: only layer names matching one of these globs (all when empty).
        exclude: never layers matching these globs.
        unit: ``layer`` (one group per layer) or ``block`` (one group per transformer block).
    """
    candidates = tunable_layers(model)
    if exclude_first_last:
        candidates = candidates[1:-1]
    out = []
    for name, module in candidates:
        spec = LayerSpec(name, kind_of_module(module) or "linear", tuple(module.weight.shape),
                         TensorRef(f"{name}.weight", tuple(module.weight.shape), module.weight.dtype,
                                   load=lambda m=module: m.weight.detach()))
        if spec.n_evals < min_evals:
            continue
        if not selected(name, include, exclude):
            continue
        out.append(TunedLayer(name, block_of(name) if unit == "block" else name, spec, module))
    return out


def param_groups(model: nn.Module, layers: list[TunedLayer]) -> list[dict]:
    """Optimizer param groups: one per unit of ``layers`` (with the norm that follows each layer) and
    ``default`` for every other trainable parameter. Each parameter is in exactly one group."""
    model = unwrap(model)
    unit_of = {id(t.module): t.unit for t in layers}
    owner: dict[int, str] = {}
    last_unit = None
    for _, module in model.named_modules():
        if id(module) in unit_of:
            last_unit = unit_of[id(module)]
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), last_unit)
        elif isinstance(module, TUNABLE):
            last_unit = None
        elif isinstance(module, NORMS) and last_unit is not None:
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), last_unit)
            last_unit = None
    groups: dict[str, list] = {t.unit: [] for t in layers}
    groups[DEFAULT_GROUP] = []
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups[owner.get(id(p), DEFAULT_GROUP)].append(p)
    return [{"name": name, "params": params, "lr_scale": 1.0} for name, params in groups.items() if params]
