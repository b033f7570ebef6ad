"""Magnitude pruning of one tensor: exactly ``k`` entries, those of smallest |w|, set to zero in place.

Zeros already in a tensor are its smallest magnitudes, so pruning to ``k`` zeroes them first: a tensor that
holds ``z`` zeros holds max(z, k) after `prune_smallest_` — the target counts every zero of the output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# (zeros in the input, zeros in the output) of each pruned slice: None for a whole tensor, e for expert e
Counts = dict[int | None, tuple[int, int]]


def count_zeros(weight: torch.Tensor) -> int:
    """The entries equal to zero (``-0.0`` included; NaN is not zero)."""
    return int(torch.count_nonzero(weight == 0))


def prune_slices_(weight: torch.Tensor, cuts: Mapping[int | None, int]) -> Counts:
    """Prune, in place, each slice of a contiguous tensor to ``k`` zeros (``cuts``: slice → k; None is the
    whole tensor, ``e`` the slice ``weight[e]`` of a stack of expert matrices, each pruned on its own).
    A slice that already holds ``k`` zeros or more is left as it is. Returns (zeros before, zeros after)."""
    out: Counts = {}
    for index, k in cuts.items():
        part = weight if index is None else weight[index]
        before = count_zeros(part)
        if k > before:
            prune_smallest_(part, k)
        out[index] = (before, count_zeros(part))
    return out


def expected_counts(weight: torch.Tensor, cuts: Mapping[int | None, int]) -> Counts:
    """What `prune_slices_` would give, without changing ``weight``: (z, max(z, k)) per slice."""
    out: Counts = {}
    for index, k in cuts.items():
        before = count_zeros(weight if index is None else weight[index])
        out[index] = (before, max(before, k))
    return out


def prune_smallest_(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Zero, in place, the ``k`` entries of smallest magnitude of a contiguous tensor; ties go by lowest flat
    index and NaN counts as the largest magnitude. Returns ``weight``."""
    flat = weight.view(-1)
    if k <= 0:
        return weight
    if k >= flat.numel():
        return weight.zero_()
    score = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.float().abs()
    score.masked_fill_(score.isnan(), math.inf)
    bits = score.view(torch.int32 if score.dtype == torch.float32 else torch.int64)  # ordered as the magnitudes
    threshold = _kth_smallest(bits, k)
    below = bits < threshold
    ties = torch.nonzero(bits == threshold).view(-1)[: k - int(torch.count_nonzero(below))]
    flat.masked_fill_(below, 0)
    flat[ties] = 0
    return weight


def _kth_smallest(bits: torch.Tensor, k: int) -> int:
    """The k-th smallest (1-based) of non-negative integers: bisection narrows (lo, hi] to a few candidates and
    an exact selection among them finishes, so the memory is a mask, not a sorted copy and its indices."""
    lo, hi = -1, int(bits.max())
    below_lo, upto_hi = 0, bits.numel()  # how many are ≤ lo (fewer than k) and ≤ hi (at least k)
    while hi - lo > 1 and upto_hi - below_lo > max(1 << 16, bits.numel() >> 6):
        mid = (lo + hi) // 2
        count = int(torch.count_nonzero(bits <= mid))
        if count >= k:
            hi, upto_hi = mid, count
        else:
            lo, below_lo = mid, count
    return int(torch.kthvalue(bits[(bits > lo) & (bits <= hi)], k - below_lo).values)
