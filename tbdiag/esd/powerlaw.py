"""Power-law fits of an eigenvalue tail: the Hill estimate of alpha with three ways to choose xmin.

For ascending eigenvalues λ (N of them) and a candidate xmin = λᵢ with tail size n = N − i:

    alpha(i) = 1 + n / (Σ_{j≥i} log λⱼ − n·log λᵢ)                  (Hill / maximum likelihood)
    D(i)     = max_{k<n} | 1 − (λ_{i+k}/λᵢ)^(1−alpha) − k/n |       (Kolmogorov–Smirnov distance)
    alpha_err = (alpha − 1) / √n                                    (standard error)

``median`` takes i = ⌊N / xmin_pos⌋; ``ks`` the i of smallest D (Clauset, Shalizi & Newman 2009);
``peak`` the smallest D among candidates near the mode of the log-ESD. Every alpha(i) comes at once from
suffix sums of log λ, and D for many candidates at once from chunked tensor operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

KS_CHUNK_ELEMENTS = 1 << 22  # elements of one (candidates × tail) block of the KS scan


@dataclass(frozen=True)
class PowerLawFit:
    """Result of one fit. A failed fit has ``nan`` values and a ``status`` other than ``ok``."""

    alpha: float
    alpha_err: float
    xmin: float
    D: float
    n_tail: int
    status: str = "ok"


def failed_fit(status: str) -> PowerLawFit:
    """A fit that could not be made, with the reason in ``status``."""
    return PowerLawFit(math.nan, math.nan, math.nan, math.nan, 0, status)


def hill_alphas(evals: torch.Tensor) -> torch.Tensor:
    """alpha(i) for every candidate xmin = λᵢ; ``inf`` where the tail is constant.

    Args:
        evals: ``(N,)`` ascending, positive eigenvalues.
    """
    log_ev = evals.log()  # (N,)
    suffix = log_ev.flip(0).cumsum(0).flip(0)  # (N,) Σ_{j≥i} log λⱼ
    n = torch.arange(len(evals), 0, -1, device=evals.device, dtype=evals.dtype)  # (N,) tail sizes N − i
    return 1 + n / (suffix - n * log_ev)


def ks_distances(evals: torch.Tensor, alphas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """KS distance D(i) for the candidate indices ``idx`` (ascending), with their alphas.

    Works in blocks of candidates × tail so memory stays bounded for any N.
    """
    n_total = len(evals)
    log_ev = evals.log()  # (N,)
    out = torch.empty(len(idx), device=evals.device, dtype=evals.dtype)  # (c,)
    start = 0
    while start < len(idx):
        first = int(idx[start])
        width = n_total - first
        sel = idx[start:start + max(1, KS_CHUNK_ELEMENTS // width)]  # (c,)
        j = torch.arange(first, n_total, device=evals.device)  # (w,)
        k = (j[None, :] - sel[:, None]).to(evals.dtype)  # (c, w) position inside each tail
        t = log_ev[None, first:] - log_ev[sel, None]  # (c, w) log(λⱼ / λᵢ)
        cdf = 1 - torch.exp((1 - alphas[sel, None]) * t)  # (c, w)
        n = (n_total - sel).to(evals.dtype)[:, None]  # (c, 1)
        gap = (cdf - k / n).abs().masked_fill(k < 0, 0)  # (c, w)
        out[start:start + len(sel)] = gap.max(dim=1).values
        start += len(sel)
    return out


def _fit_at(evals: torch.Tensor, alpha: float, i: int, D: float) -> PowerLawFit:
    n = len(evals) - i
    if not math.isfinite(alpha):
        return failed_fit("degenerate")
    return PowerLawFit(alpha, (alpha - 1) / math.sqrt(n), float(evals[i]), D, n)


def fit_median(evals: torch.Tensor, xmin_pos: float = 2.0) -> PowerLawFit:
    """Hill estimate with xmin at index ⌊N / xmin_pos⌋ (the median of the ESD for xmin_pos = 2)."""
    if len(evals) < 2:
        return failed_fit("too_few_evals")
    i = int(len(evals) / xmin_pos)
    i = min(i, len(evals) - 2)
    alpha = hill_alphas(evals[i:])[0:1]  # (1,)
    if not torch.isfinite(alpha).all():
        return failed_fit("degenerate")
    D = ks_distances(evals[i:], alpha, torch.zeros(1, dtype=torch.long, device=evals.device))
    return _fit_at(evals, float(alpha), i, float(D))


def ks_bounds(evals: torch.Tensor, alphas: torch.Tensor, idx: torch.Tensor,
              points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of D(i) for the candidates ``idx``, from ``points`` positions of each tail.

    The gap between model and empirical CDF is evaluated at ``points`` evenly spread positions of each
    candidate's tail (its first and last included); its maximum there is a lower bound of D(i). Both CDFs
    rise monotonically, so between two evaluated positions p < q every gap lies within
    [cdf(p) − emp(q), cdf(q) − emp(p)]: the largest of those ends is an upper bound.
    """
    n_total = len(evals)
    log_ev = evals.log()  # (N,)
    n = (n_total - idx).to(evals.dtype)  # (c,) tail sizes
    frac = torch.linspace(0, 1, points, device=evals.device, dtype=evals.dtype)  # (p,)
    k = (frac[None, :] * (n[:, None] - 1)).floor()  # (c, p) positions inside each tail
    j = idx[:, None] + k.long()  # (c, p) eigenvalue indices
    cdf = 1 - torch.exp((1 - alphas[idx, None]) * (log_ev[j] - log_ev[idx, None]))  # (c, p)
    emp = k / n[:, None]  # (c, p)
    lower = (cdf - emp).abs().amax(dim=1)  # (c,)
    rise = (cdf[:, 1:] - emp[:, :-1]).amax(dim=1)  # (c,)
    fall = (emp[:, 1:] - cdf[:, :-1]).amax(dim=1)  # (c,)
    return lower, torch.maximum(lower, torch.maximum(rise, fall))


def ks_argmin(evals: torch.Tensor, alphas: torch.Tensor, idx: torch.Tensor,
              levels: tuple[int, ...] = (32, 256)) -> tuple[int, float]:
    """The candidate of smallest D (the first one on ties) and its D, as a full scan would find them.

    Bounds from a few points of every tail discard each candidate whose lower bound exceeds the best
    upper bound; only the survivors get the exact O(n) scan. The result is exact, not an approximation.
    """
    best_upper = math.inf
    for points in levels:
        if len(idx) <= 32 or points >= len(evals) // 2:
            break
        lower, upper = ks_bounds(evals, alphas, idx, points)
        best_upper = min(best_upper, float(upper.min()))
        idx = idx[lower <= best_upper + 1e-9]  # keeps ties and absorbs rounding
    D = ks_distances(evals, alphas, idx)  # (survivors,)
    best = int(torch.argmin(D))
    return int(idx[best]), float(D[best])


def fit_over(evals: torch.Tensor, candidates: torch.Tensor) -> PowerLawFit:
    """Hill estimate at the candidate xmin (indices into ``evals``) with the smallest KS distance."""
    alphas = hill_alphas(evals)  # (N,)
    candidates = candidates[torch.isfinite(alphas[candidates]) & (alphas[candidates] > 1)]
    if len(candidates) == 0:
        return failed_fit("degenerate")
    i, D = ks_argmin(evals, alphas, candidates)
    return _fit_at(evals, float(alphas[i]), i, D)


def fit_ks(evals: torch.Tensor) -> PowerLawFit:
    """Hill estimate at the xmin of smallest KS distance over all candidates λ₀ … λ_{N−2}."""
    if len(evals) < 2:
        return failed_fit("too_few_evals")
    return fit_over(evals, torch.arange(len(evals) - 1, device=evals.device))


def fit_peak(evals: torch.Tensor, bins: int = 100, lower_bound_quirk: bool = False) -> PowerLawFit:
    """KS search restricted to xmin in [0.95·p, 1.5·p], p the left edge of the fullest log10-ESD bin.

    Args:
        evals: ``(N,)`` ascending, positive eigenvalues.
        bins: histogram bins over log10 λ.
        lower_bound_quirk: reproduce the reference implementation, which compares log10(0.95·p) with raw
            eigenvalues and so usually applies no lower bound.
    """
    if len(evals) < 2:
        return failed_fit("too_few_evals")
    log10 = evals.log10()  # (N,)
    lo, hi = float(log10[0]), float(log10[-1])
    counts = torch.histc(log10, bins=bins, min=lo, max=hi)  # (bins,)
    edges = torch.linspace(lo, hi, bins + 1, dtype=evals.dtype)  # (bins + 1,)
    peak = 10 ** float(edges[int(torch.argmax(counts))])
    lower = math.log10(0.95 * peak) if lower_bound_quirk else 0.95 * peak
    head = evals[:-1]  # (N − 1,) candidates
    candidates = torch.nonzero((head >= lower) & (head <= 1.5 * peak)).flatten()
    if len(candidates) == 0:  # bins wider than the window: fall back to every candidate
        candidates = torch.arange(len(head), device=evals.device)
    return fit_over(evals, candidates)


FITS: dict[str, Callable[..., PowerLawFit]] = {"median": fit_median, "ks": fit_ks, "peak": fit_peak}
