"""The data passed from reading a checkpoint to planning its layers: named tensors, not yet read, and the
rule that names them (`clean_name`).

Its own module so that `checkpoint` (which opens files and modules) and `layers` (which decides what a
tensor is) both depend on it and not on each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

WRAPPER_PREFIX = re.compile(r"^(module\.)+")


def clean_name(name: str) -> str:
    """Strip DataParallel's leading ``module.`` and torch.compile's ``_orig_mod.`` components."""
    name = WRAPPER_PREFIX.sub("", name)
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def name_under(name: str, key: str | None) -> str | None:
    """The clean name of a flat checkpoint's tensor (safetensors) below ``key``, the dotted entry a nested one
    would keep it under (``ema`` → ``ema.fc.weight`` is ``fc.weight``); None when it is not below ``key``."""
    if not key:
        return clean_name(name)
    prefix = key + "."
    for candidate in (name, clean_name(name)):  # ``module.ema.fc.weight``: below ``module.ema`` and ``ema``
        if candidate.startswith(prefix):
            return clean_name(candidate[len(prefix):])
    return None


@dataclass(frozen=True)
class TensorRef:
    """One named tensor of a checkpoint, not yet read.

    Attributes:
        name: tensor name after wrapper prefixes (``module.``, ``_orig_mod.``) are stripped.
        shape: tensor shape.
        dtype: tensor dtype.
        load: reads the tensor (a memory-mapped view where the format allows).
        kind_hint: layer kind from the module type, when the source was a live module.
        load_rows: reads ``tensor[start:stop]`` along dim 0 without reading the rest, where the format
            allows (safetensors); otherwise `load_slice` slices what `load` returns.
        transposed: the weight is stored in × out (transformers' GPT-2 ``Conv1D``), known from the module.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    kind_hint: str | None = None
    load_rows: Callable[[int, int], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    transposed: bool = False

    def load_slice(self, start: int, stop: int) -> torch.Tensor:
        """``tensor[start:stop]`` (dim 0), reading only those rows where the format allows."""
        return self.load_rows(start, stop) if self.load_rows is not None else self.load()[start:stop]


def numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape."""
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class Checkpoint:
    """What `open_checkpoint` found: the source, its format, and its tensors in checkpoint order."""

    source: str
    format: str
    tensors: tuple[TensorRef, ...]

    @property
    def n_params(self) -> int:
        """Number of elements over all floating-point tensors."""
        return sum(numel(t.shape) for t in self.tensors if t.dtype.is_floating_point)
