"""What fine-tuning did: each layer's change ΔW = W − W_base against the model it was fine-tuned from.

Both checkpoints are opened lazily and planned alike (same layer filters, q/k/v split, FP8 scales); every
layer of the fine-tuned model is paired by name with the base model's and checked by shape before any
weight is read, then each ΔW is read as the two tensors of one layer and their difference (in float32, or
float64 when either is) — never more than one layer of each model in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tbdiag.errors import TbdiagError
from tbdiag.layers import LayerSpec
from tbdiag.tensors import TensorRef


def pair_specs(tuned: list[LayerSpec], base: list[LayerSpec], tuned_source: str,
               base_source: str) -> tuple[list[LayerSpec], int]:
    """ΔW specs for the fine-tuned layers, and how many base layers have no fine-tuned counterpart.

    Raises:
        TbdiagError: a fine-tuned layer missing from the base, or of another shape there (the first one found).
    """
    by_name = {s.name: s for s in base}
    missing = [s.name for s in tuned if s.name not in by_name]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TbdiagError(f"{tuned_source}: layer {missing[0]}{more} not in the base {base_source}; pass the base model "
                          "it was fine-tuned from, or leave such layers out with exclude patterns",
                          cli={"exclude patterns": "--exclude"})
    specs = []
    for spec in tuned:
        other = by_name[spec.name]
        if tuple(other.shape) != tuple(spec.shape):
            raise TbdiagError(f"{tuned_source}: layer {spec.name} is {list(spec.shape)} but {list(other.shape)} in the "
                              f"base {base_source}; pass the base model it was fine-tuned from, or leave the layer out "
                              "with an exclude pattern", cli={"an exclude pattern": "--exclude"})
        ref = TensorRef(spec.ref.name, spec.shape, _dtype(spec.ref.dtype, other.ref.dtype),
                        load=_difference(spec.ref, other.ref), kind_hint=spec.ref.kind_hint,
                        transposed=spec.ref.transposed)
        specs.append(dataclasses.replace(spec, ref=ref))
    tuned_names = {s.name for s in tuned}
    return specs, sum(1 for s in base if s.name not in tuned_names)


def _dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _difference(tuned: TensorRef, base: TensorRef) -> Callable[[], torch.Tensor]:
    dtype = _dtype(tuned.dtype, base.dtype)

    def load() -> torch.Tensor:
        return tuned.load().to(dtype) - base.load().to(dtype)
    return load
