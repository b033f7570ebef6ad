"""The one rule for which layers TempBalance tunes, their units (param groups) and their names.

`recommend` (on a checkpoint's analysis), `TempBalance` (on a live model), `tbdiag train` and the reports
all decide with the functions here, over the same planned layers (`tbdiag.esd.layers.plan_layers`: a live
model is planned exactly as a saved checkpoint of it), so they agree on group names and multipliers.

**Candidates**: Linear, Conv1d/2d/3d, transformers' ``Conv1D`` (stored in × out) and the in-projection of
``nn.MultiheadAttention``; embeddings only when asked; a tied weight once (where it first appears).
**Left at the global rate**: the input and output layers (unless ``include_first_last``) — in a model built of
numbered blocks (``layer1.0``, ``model.layers.3``, ``h.11``) every candidate outside the blocks (the stem
and the head, whatever order a file stores them in), otherwise the first and the last candidate; layers
with fewer than ``min_evals`` eigenvalues; names filtered out by the ``include``/``exclude`` globs.
**Units**: ``layer`` — one group per weight tensor (the q/k/v parts of a split fused matrix, or the experts
of a stacked MoE tensor, share their tensor's group and its mean value); ``block`` — one group per block.
**Parameters of a unit** (live model): the tuned layer's own parameters (weight, bias); with ``layer`` a
BatchNorm directly after a tuned conv (as the reference pairs them); with ``block`` every parameter inside
the block (LayerNorm/RMSNorm included) except those of candidate layers that are not tuned. LayerNorm and
RMSNorm never join a neighbouring layer's group. Everything else is in the group ``default``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from tbdiag.analysis.options import FEWEST_EVALS, FEWEST_EVALS_RULE
from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import LayerSpec, layer_name, selected

DEFAULT_GROUP = "default"
TUNABLE_KINDS = ("linear", "conv1d", "conv2d", "conv3d")
UNITS = ("layer", "block")
MIN_EVALS = 50  # layers with fewer eigenvalues are left alone: the reference's threshold, a fit needs enough tail
BLOCK = re.compile(r"^(.*?\.\d+)\.")  # the name up to its first numeric component: model.layers.3
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class TuneOptions:
    """What decides the tuned layers and their units (shared by `recommend` and `TempBalance`)."""

    unit: str = "layer"
    include_first_last: bool = False  # also the input and output layers
    min_evals: int = MIN_EVALS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    split_qkv: bool = False

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise TbdiagError(f"unit {self.unit!r}: use one of {', '.join(UNITS)}")
        if self.min_evals < FEWEST_EVALS:
            raise TbdiagError(f"min_evals {self.min_evals}: {FEWEST_EVALS_RULE}", cli={"min_evals ": "--min-evals "})


@dataclass(frozen=True)
class Tuned:
    """A tuned layer: its name (as in the analysis), its unit (param-group name) and its weight tensor."""

    name: str
    unit: str
    tensor: str


def block_of(name: str) -> str:
    """The block a layer belongs to: ``model.layers.3.mlp.up`` → ``model.layers.3`` (itself if none)."""
    found = BLOCK.match(name)
    return found.group(1) if found else name


def in_block(name: str) -> bool:
    """Whether a layer lies inside a numbered block (``features.0`` is a numbered layer, not a block)."""
    return BLOCK.match(name) is not None


def tuned_layers(layers: Sequence, options: TuneOptions = TuneOptions()) -> list[Tuned]:
    """The tuned layers among planned layers or analysis rows, in their order.

    Args:
        layers: objects with ``name``, ``kind`` and ``n_evals`` (`LayerSpec`, `LayerResult`), in model order;
            a `LayerSpec` also names its weight tensor (fused parts share it).
        options: the rule's options.
    """
    kinds = TUNABLE_KINDS + (("embedding",) if options.embeddings else ())
    candidates = [x for x in layers if x.kind in kinds]
    if not options.include_first_last:
        if any(in_block(x.name) for x in candidates):
            candidates = [x for x in candidates if in_block(x.name)]
        else:
            candidates = candidates[1:-1]
    out = []
    for x in candidates:
        if x.n_evals < options.min_evals or not selected(x.name, options.include, options.exclude):
            continue
        tensor = getattr(x, "tensor", "") or tensor_of(x.name)
        unit = block_of(x.name) if options.unit == "block" else layer_name(tensor)
        out.append(Tuned(x.name, unit, tensor))
    return out


def tensor_of(name: str) -> str:
    """The weight tensor of a layer known only by name (an analysis row): ``fc`` → ``fc.weight``; the q/k/v
    parts of a split fused matrix name their fused tensor (``attn.c_attn.q`` → ``attn.c_attn.weight``)."""
    base, _, last = name.rpartition(".")
    if base and last in ("q", "k", "v") and FUSED_TAIL.search(base):
        name = base
    elif base and last.isdigit() and "expert" in base.lower() and not base.lower().endswith("experts"):
        return base  # expert e of a stacked (E, out, in) tensor: mlp.experts.gate_up_proj.3
    return name if name.endswith("_weight") else f"{name}.weight"


FUSED_TAIL = re.compile(r"(^|[._])(qkv|qkv_proj|c_attn|query_key_value|wqkv|in_proj|in_proj_weight)$", re.IGNORECASE)


def units_in_order(tuned: Sequence[Tuned]) -> list[str]:
    """The distinct units, in model order."""
    return list(dict.fromkeys(t.unit for t in tuned))


def plan_model(model: nn.Module, options: TuneOptions) -> list[LayerSpec]:
    """A live model's layers, planned exactly as a checkpoint of it would be (`tbdiag.esd.layers.plan_layers`)."""
    from tbdiag.io.checkpoint import open_checkpoint
    from tbdiag.esd.layers import plan_layers

    specs, _ = plan_layers(open_checkpoint(unwrap(model)), include_embeddings=options.embeddings,
                           split_qkv=options.split_qkv)
    return specs


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unit_of_parameters(model: nn.Module, tuned: Sequence[Tuned], specs: Sequence[LayerSpec],
                       unit: str) -> dict[str, str]:
    """``{parameter name: unit}`` for every parameter that follows a tuned unit (the rest: ``default``).

    Parameter names are those of ``unwrap(model).named_parameters()`` (tied parameters once), as they are:
    they are matched to the tuned layers through `clean_name`, as the layers were named (a submodule called
    ``module`` or a compiled submodule's ``_orig_mod`` do not hide a layer).
    """
    from tbdiag.io.tensors import clean_name

    model = unwrap(model)
    tensor_unit = {t.tensor: t.unit for t in tuned}
    candidate_modules = {s.tensor.rpartition(".")[0] for s in specs if s.kind in TUNABLE_KINDS}
    named: dict[str, str] = {}  # clean name → name as named_parameters gives it
    out: dict[str, str] = {}
    last_unit = None  # unit of the tuned conv just visited, for a BatchNorm right after it
    for raw, module in model.named_modules():
        mname = clean_name(raw)
        pnames = [p for p, _ in module.named_parameters(recurse=False)]
        own = [(f"{mname}.{p}" if mname else p) for p in pnames]
        named.update({o: (f"{raw}.{p}" if raw else p) for o, p in zip(own, pnames)})
        layer_units = [tensor_unit[n] for n in own if n in tensor_unit]
        if layer_units:
            out.update({n: out.get(n, layer_units[0]) for n in own})
            last_unit = layer_units[0] if unit == "layer" else None
        elif isinstance(module, BATCH_NORMS) and last_unit is not None:
            out.update({n: last_unit for n in own})
            last_unit = None
        elif own or mname in candidate_modules:
            last_unit = None
        if unit == "block" and mname not in candidate_modules:
            block = block_of(f"{mname}.x") if mname else ""
            if block in set(tensor_unit.values()):
                out.update({n: out.get(n, block) for n in own})
    return {named[n]: u for n, u in out.items()}


def sparsity_units(tuned: Sequence[Tuned], unit: str) -> list[str]:
    """The units sparsity is allocated over: each block with ``block``; otherwise each layer as `analyze` names
    it, so an expert of a stacked (E, out, in) tensor is a unit of its own (TempBalance's units keep a stack's
    experts together: they share one tensor, so one param group)."""
    return [t.unit if unit == "block" else t.name for t in tuned]
