"""What fine-tuning did: each layer's change ΔW = W − W_base against the model it was fine-tuned from.

Both checkpoints are opened lazily and planned alike (same layer filters, q/k/v split, FP8 scales); every
layer of the fine-tuned model is paired by name with the base model's and checked by shape before any
weight is read, then each ΔW is read as the two tensors of one layer and their difference W − W_base (in
float32, or float64 when either is: a small change of large float64 weights would not survive float32) —
never more than one layer of each model in memory.

The pairing rule, shared with `tbdiag.finetune.diff`: layers pair by name, and a same-named layer of another shape
(`changed_shapes`) is never subtracted nor compared. Here it is refused (a ΔW needs both shapes equal: the
base is not the model this one was fine-tuned from, or the layer was resized and has to be left out);
``diff`` lists it apart (``changed_shape``), beside the layers only one side has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch

from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import LayerSpec
from tbdiag.io.tensors import TensorRef


def pair_specs(tuned: list[LayerSpec], base: list[LayerSpec], tuned_source: str,
               base_source: str) -> tuple[list[LayerSpec], int]:
    """ΔW specs for the fine-tuned layers, and how many base layers have no fine-tuned counterpart.

    Raises:
        TbdiagError: fine-tuned layers missing from the base, or of another shape there (the first one named,
            and how many more).
    """
    by_name = {s.name: s for s in base}
    missing = [s.name for s in tuned if s.name not in by_name]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TbdiagError(f"{tuned_source}: layer {missing[0]}{more} not in the base {base_source}; pass the base model "
                          "it was fine-tuned from, or leave such layers out with exclude patterns",
                          cli={"exclude patterns": "--exclude"})
    changed = changed_shapes({s.name: s.shape for s in tuned}, {s.name: s.shape for s in base})
    if changed:
        name, mine, theirs = changed[0]
        more = f" (and {len(changed) - 1} more layers of another shape)" if len(changed) > 1 else ""
        raise TbdiagError(f"{tuned_source}: layer {name} is {mine} but {theirs} in the base {base_source}{more}; pass "
                          "the base model it was fine-tuned from, or leave the layer out with an exclude pattern",
                          cli={"an exclude pattern": "--exclude"})
    specs = []
    for spec in tuned:
        other = by_name[spec.name]
        ref = TensorRef(spec.ref.name, spec.shape, _dtype(spec.ref.dtype, other.ref.dtype),
                        load=_difference(spec.ref, other.ref), kind_hint=spec.ref.kind_hint,
                        transposed=spec.ref.transposed)
        specs.append(dataclasses.replace(spec, ref=ref))
    tuned_names = {s.name for s in tuned}
    return specs, sum(1 for s in base if s.name not in tuned_names)


def changed_shapes(a: Mapping[str, Sequence[int]],
                   b: Mapping[str, Sequence[int]]) -> list[tuple[str, list[int], list[int]]]:
    """(name, shape in a, shape in b) of each layer both name with different shapes, in the order of ``a``."""
    return [(name, list(shape), list(b[name])) for name, shape in a.items()
            if name in b and tuple(shape) != tuple(b[name])]


def _dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _difference(tuned: TensorRef, base: TensorRef) -> Callable[[], torch.Tensor]:
    """W − W_base, read when called, in float64 when either is (else float32)."""
    dtype = _dtype(tuned.dtype, base.dtype)

    def load() -> torch.Tensor:
        return tuned.load().to(dtype) - base.load().to(dtype)
    return load
