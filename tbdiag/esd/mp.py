"""Marchenko–Pastur view of a layer's ESD: the bulk, its edge, the spikes above it, soft rank and entropy.

Definitions follow WeightWatcher 0.7.7 (``mp_fit``, ``matrix_entropy``, ``rand_distance``), so that its
users read the same numbers; tbdiag computes them from the eigenvalues it already has.

For an N × M layer (N ≥ M; a convolution's kernel slices pooled, M the smaller side of a slice) with
eigenvalues λ of WᵀW, Q = N/M ≥ 1:

- **Units.** The eigenvalues are rescaled to mean 1, λ̃ = λ · n/Σλ (n eigenvalues), which makes the fit
  independent of tbdiag's normalisation (no 1/N, convolution slices scaled by conv_norm).
- **σ (``mp_sigma``).** The MP density of variance σ², with edges λ± = σ²(1 ± 1/√Q)², is fitted to a
  kernel density estimate of λ̃ (triangular kernel, bandwidth 0.1, on 1000 points from 0 to max λ̃ + 0.5;
  points of density ≤ 0.01 are left out) by least squares: a grid of σ from 0.05·s to 2·s in steps of
  0.01·s, with s = √(max λ̃)/(1 + 1/√Q), then Nelder–Mead from the best grid point. A σ whose upper edge
  λ₊ lies left of the density's peak or beyond the last point, or whose lower edge lies right of the peak,
  is penalised. For Q = 1 the quarter-circle law is fitted to the singular values √λ̃ instead. When no KDE point
  is left (one eigenvalue so far above the rest that the grid's spacing, (max λ̃ + 0.5)/999, exceeds the
  bandwidth and misses the bulk) there is nothing to fit: every MP field is ``nan`` (``num_spikes`` None).
- **Bulk edge (``mp_bulk_max``)** λ₊ = σ²(1 + 1/√Q)², reported in tbdiag's eigenvalue units (λ₊ · Σλ/n).
  (With Q' = M/N ≤ 1 this is σ²(1 + √Q')².)
- **Spikes (``num_spikes``)**: eigenvalues above the edge plus a Tracy–Widom margin,
  λ̃ > λ₊ + √(Q^(−1/2) · λ₊^(2/3) · M^(−2/3)).
- **Soft rank (``mp_softrank``)** = λ₊ / λ_max: near 1 for a random-like layer, small when a few large
  eigenvalues dominate.
- **Matrix entropy (``matrix_entropy``)**: with p = λ/Σλ + 1e-10 over all eigenvalues and the rank r (singular
  values above σ_max·N·ε), −Σ p log p / log r: 1 for a flat spectrum, towards 0 for a low-rank one (``nan`` for
  rank ≤ 1, where WeightWatcher divides by log(1 + 1e-10)).
- **``rand_distance``**: the Jensen–Shannon distance (natural log) between the sorted eigenvalues of W and
  of its element-wise permutation, each taken as a probability vector (divided by its sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KDE_BANDWIDTH = 0.1
KDE_POINTS = 1000
DENSITY_FLOOR = 0.01  # KDE points at or below this density are left out of the residual
PENALTY = 1000.0  # residual of a σ whose MP edges do not bracket the density's peak
ENTROPY_EPS = 1e-10


@dataclass(frozen=True)
class MPFit:
    """The MP fit of one ESD (``nan`` / ``None`` where it cannot be made)."""

    sigma: float  # σ of the fitted MP law, in units where the mean eigenvalue is 1
    bulk_max: float  # λ₊ in the caller's eigenvalue units
    num_spikes: int | None  # eigenvalues above λ₊ plus the Tracy–Widom margin
    softrank: float  # λ₊ / λ_max


NO_FIT = MPFit(math.nan, math.nan, None, math.nan)


def kde_triangular(samples: np.ndarray, points: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density of a triangular-kernel KDE, (1/(n·h)) Σ max(0, 1 − |x − xᵢ|/h), at every point.

    Computed from prefix sums of the sorted samples: O((n + points)·log n) instead of n·points.
    """
    xs = np.sort(samples)
    prefix = np.concatenate(([0.0], np.cumsum(xs)))  # (n + 1,)
    lo = np.searchsorted(xs, points - bandwidth, side="right")  # first sample with x − xᵢ < h
    mid = np.searchsorted(xs, points, side="left")  # first sample ≥ x
    hi = np.searchsorted(xs, points + bandwidth, side="left")  # first sample with xᵢ − x ≥ h
    left = (mid - lo) * points - (prefix[mid] - prefix[lo])  # Σ (x − xᵢ) over the window's left part
    right = (prefix[hi] - prefix[mid]) - (hi - mid) * points  # Σ (xᵢ − x) over its right part
    total = (hi - lo) - (left + right) / bandwidth
    return np.maximum(total, 0.0) / (len(xs) * bandwidth)


def _mp_density(x: np.ndarray, q: float, sigma: np.ndarray) -> np.ndarray:
    """MP density at x for each σ: ``(k, len(x))``; 0 outside the bulk."""
    s = sigma[:, None]
    b = (s * (1 + math.sqrt(1 / q))) ** 2
    a = (s * (1 - math.sqrt(1 / q))) ** 2
    inside = (b - x) * (x - a)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inside >= 0, (1 / (2 * np.pi * s * s * x * (1 / q))) * np.sqrt(inside), 0.0)


class _Residual:
    """Sum of squared differences between the MP (or quarter-circle) law of σ and the KDE of the ESD."""

    def __init__(self, to_fit: np.ndarray, q: float) -> None:
        x = np.linspace(0, np.max(to_fit) + 0.5, KDE_POINTS)
        y = kde_triangular(to_fit, x, KDE_BANDWIDTH)
        keep = y > DENSITY_FLOOR
        self.x, self.y, self.q = x[keep], y[keep], q
        self.peak = self.x[np.argmax(self.y)] if len(self.y) else math.nan  # callers check len(x) first
        with np.errstate(invalid="ignore"):  # quarter circle of singular values: √(4 − x²), 0 beyond 2
            circle = np.nan_to_num(np.sqrt(4 - self.x ** 2))
        self.sums = (float(circle @ circle), float(circle @ self.y), float(self.y @ self.y))

    def __call__(self, sigma: np.ndarray) -> np.ndarray:
        """Residuals of every σ of a 1-D array (at least one KDE point kept)."""
        if self.q == 1:
            return self.grid(sigma)
        b = (sigma * (1 + math.sqrt(1 / self.q))) ** 2
        a = (sigma * (1 - math.sqrt(1 / self.q))) ** 2
        bad = (b < self.peak) | (b > self.x[-1]) | (a > self.peak)
        out = np.full(len(sigma), PENALTY ** 2 * len(self.x))
        if not bad.all():  # the density only where it is not penalised
            out[~bad] = ((_mp_density(self.x, self.q, sigma[~bad]) - self.y) ** 2).sum(axis=1)
        return out

    def grid(self, sigma: np.ndarray) -> np.ndarray:
        """Quarter circle: Σ (c·√(4 − x²) − y)² with c = 1/(πσ²), from three sums (a quadratic in c; equal to
        the direct sums to rounding)."""
        c = 1 / (np.pi * sigma * sigma)
        return c * c * self.sums[0] - 2 * c * self.sums[1] + self.sums[2]


def nelder_mead_1d(f, x0: float, xatol: float = 1e-4, fatol: float = 1e-4, max_calls: int = 200) -> float:  # noqa: ANN001
    """Minimise a function of one variable by Nelder–Mead from x0 (simplex x0, 1.05·x0), with the usual
    coefficients (reflection 1, expansion 2, contraction ½, shrink ½) and stopping rules."""
    calls = 0

    def fx(x: float) -> float:
        nonlocal calls
        calls += 1
        return float(f(np.array([x]))[0])

    sim = [x0, 1.05 * x0 if x0 != 0 else 0.00025]
    fs = [fx(sim[0]), fx(sim[1])]
    if fs[1] < fs[0]:
        sim, fs = sim[::-1], fs[::-1]
    while calls < max_calls:  # every iteration makes two calls, so this also bounds the iterations
        if abs(sim[1] - sim[0]) <= xatol and abs(fs[0] - fs[1]) <= fatol:
            break
        best, worst = sim[0], sim[1]
        xr = 2 * best - worst
        fr = fx(xr)
        if fr < fs[0]:
            xe = 3 * best - 2 * worst
            fe = fx(xe)
            sim[1], fs[1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < fs[1]:  # outside contraction
            xc = 1.5 * best - 0.5 * worst
            fc = fx(xc)
            if fc <= fr:
                sim[1], fs[1] = xc, fc
            else:
                sim[1] = best + 0.5 * (worst - best)
                fs[1] = fx(sim[1])
        else:  # inside contraction
            xcc = 0.5 * best + 0.5 * worst
            fcc = fx(xcc)
            if fcc < fs[1]:
                sim[1], fs[1] = xcc, fcc
            else:
                sim[1] = best + 0.5 * (worst - best)
                fs[1] = fx(sim[1])
        if fs[1] < fs[0]:
            sim, fs = sim[::-1], fs[::-1]
    return sim[0]


def fit_sigma(scaled: np.ndarray, q: float) -> float:
    """σ of the MP law (quarter circle for Q = 1) best fitting eigenvalues of mean 1 (grid, then Nelder–Mead);
    ``nan`` when the KDE keeps no point."""
    s = math.sqrt(float(np.max(scaled)) / (1 + 1 / math.sqrt(q)) ** 2)
    grid = np.arange(0.05 * s, 2.0 * s, 0.01 * s)
    residual = _Residual(np.sqrt(scaled) if q == 1 else scaled, q)
    if not len(residual.x):
        return math.nan
    start = float(grid[int(np.argmin(residual(grid)))])
    return nelder_mead_1d(residual, start)


def mp_fit(evals: np.ndarray, n: int, m: int) -> MPFit:
    """MP fit of an ESD (`module docstring <tbdiag.esd.mp>`).

    Args:
        evals: eigenvalues (any order, ≥ 0, finite, not all 0).
        n: the larger side of the layer's matrices.
        m: the smaller side.
    """
    q = n / m
    evals = np.asarray(evals, dtype=np.float64)
    scale = len(evals) / float(np.sum(evals))  # eigenvalues × scale have mean 1
    scaled = evals * scale
    sigma = fit_sigma(scaled, q)
    if math.isnan(sigma):
        return NO_FIT
    bulk_max = (sigma * (1 + 1 / math.sqrt(q))) ** 2
    threshold = spike_threshold(bulk_max, q, m)
    return MPFit(sigma=sigma, bulk_max=bulk_max / scale, num_spikes=int(np.count_nonzero(scaled > threshold)),
                 softrank=bulk_max / float(np.max(scaled)))


def spike_threshold(bulk_max: float, q: float, m: int) -> float:
    """λ₊ plus the Tracy–Widom margin √(Q^(−1/2)·λ₊^(2/3)·M^(−2/3)), in units where the mean eigenvalue is 1."""
    return bulk_max + math.sqrt(1 / math.sqrt(q) * bulk_max ** (2 / 3) * m ** (-2 / 3))


def matrix_entropy(evals: np.ndarray, n: int) -> float:
    """Normalised spectral entropy −Σ p log p / log r (WeightWatcher's ``matrix_entropy``); ``nan`` for rank ≤ 1."""
    ev = np.clip(np.asarray(evals, dtype=np.float64), 0, None)
    sv = np.sqrt(ev)
    rank = int(np.count_nonzero(sv > sv.max() * n * np.finfo(np.float64).eps))
    total = float(ev.sum())
    if rank <= 1 or total <= 0:
        return math.nan
    p = ev / total + ENTROPY_EPS
    return float(-np.sum(p * np.log(p)) / np.log(rank + ENTROPY_EPS))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon distance (natural log) of two non-negative vectors of one length, each taken as a
    probability vector; the midpoint is (p + q) normalised (as WeightWatcher forms it before normalising)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / (np.sum(p) + np.sum(q))
    p, q = p / np.sum(p), q / np.sum(q)

    def kl(a: np.ndarray) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log(a / m), 0.0)
        return float(np.sum(terms))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))
