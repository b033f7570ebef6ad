"""Per-layer HT-SR metrics from a layer's eigenvalues and its power-law fit (WeightWatcher's names)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tbdiag.esd.mp import matrix_entropy, mp_fit
from tbdiag.esd.powerlaw import FITS, PowerLawFit, failed_fit

OVER_TRAINED_BELOW = 2.0  # HT-SR reading: alpha < 2 hints at an over-trained (very heavy-tailed) layer
UNDER_TRAINED_ABOVE = 6.0  # alpha > 6 hints at an under-trained (random-like) layer
# The bands above were calibrated on alphas of the KS power-law fit (Clauset–Shalizi–Newman xmin, as
# WeightWatcher fits): on the alphas of another fit (median, peak) they flag nothing meaningful.
BANDS_FIT = "ks"


@dataclass(frozen=True)
class LayerResult:
    """One row of an analysis. Values that could not be computed are ``nan``; ``status`` says why."""

    name: str
    kind: str
    shape: tuple[int, ...]
    n_evals: int
    alpha: float
    alpha_err: float
    xmin: float
    D: float
    n_tail: int
    lambda_max: float
    fnorm2: float
    alpha_weighted: float
    log_norm: float
    log_spectral_norm: float
    log_alpha_norm: float
    stable_rank: float
    status: str
    warning: str = ""
    # Marchenko–Pastur view of the ESD (`tbdiag.esd.mp`, WeightWatcher's definitions); nan/None when not fitted.
    mp_sigma: float = math.nan
    mp_bulk_max: float = math.nan
    num_spikes: int | None = None
    mp_softrank: float = math.nan
    matrix_entropy: float = math.nan
    # Randomised ESD (``randomize``): the element-wise permuted weights; nan/None/() when not computed.
    rand_lambda_max: float = math.nan
    rand_bulk_max: float = math.nan
    rand_distance: float = math.nan
    num_traps: int | None = None
    traps: tuple = ()


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else math.nan


def layer_result(name: str, kind: str, shape: tuple[int, ...], evals: torch.Tensor, *, fit: str = "median",
                 fit_kwargs: dict | None = None, min_evals: int = 10, zero_rtol: float = 1e-12) -> LayerResult:
    """Fit and measure one layer.

    Args:
        name: layer name.
        kind: layer kind (``linear``, ``conv2d`` …).
        shape: weight shape.
        evals: ``(n_evals,)`` ascending eigenvalues of the layer's pooled ESD.
        fit: estimator name, a key of `tbdiag.esd.powerlaw.FITS`.
        fit_kwargs: extra arguments of the estimator (``xmin_pos``, ``bins`` …).
        min_evals: below this many eigenvalues the layer is measured but not fitted.
        zero_rtol: eigenvalues at or below ``zero_rtol · lambda_max`` count as numerical zeros.
    """
    n_evals = len(evals)
    nan = math.nan
    if n_evals == 0 or not bool(torch.isfinite(evals).all()):
        return LayerResult(name, kind, shape, n_evals, nan, nan, nan, nan, 0, nan, nan, nan, nan, nan, nan, nan,
                           "non_finite", "weights contain nan or inf")
    lambda_max, fnorm2 = float(evals[-1]), float(evals.sum())
    nonzero = evals[evals > zero_rtol * lambda_max]  # (n_nonzero,)
    warning = ""
    if lambda_max == 0:
        pl = failed_fit("zero_matrix")
    elif n_evals < min_evals:
        pl = failed_fit("too_few_evals")
    elif len(nonzero) < 2:
        pl = failed_fit("degenerate")
        warning = f"rank {len(nonzero)}"
    else:
        pl = FITS[fit](nonzero, **(fit_kwargs or {}))
        if len(nonzero) < n_evals:
            warning = f"{n_evals - len(nonzero)} zero eigenvalues left out of the fit"
    row = _row(name, kind, shape, evals, pl, lambda_max, fnorm2, warning)
    return dataclasses.replace(row, **mp_fields(evals, shape, min_evals)) if lambda_max > 0 else row


def mp_fields(evals: torch.Tensor, shape: tuple[int, ...], min_evals: int) -> dict:
    """The Marchenko–Pastur fields of a row (`tbdiag.esd.mp`): the fit needs ``min_evals`` eigenvalues, the
    entropy only a rank of at least 2. ``evals`` are finite, ascending, with a positive maximum."""
    ev = evals.double().cpu().numpy()
    n, m = max(shape[0], shape[1]), min(shape[0], shape[1])
    out = {"matrix_entropy": matrix_entropy(ev, n)}
    if len(ev) >= min_evals:
        fit = mp_fit(ev, n, m)
        out.update(mp_sigma=fit.sigma, mp_bulk_max=fit.bulk_max, num_spikes=fit.num_spikes,
                   mp_softrank=fit.softrank)
    return out


def _row(name: str, kind: str, shape: tuple[int, ...], evals: torch.Tensor, pl: PowerLawFit,
         lambda_max: float, fnorm2: float, warning: str) -> LayerResult:
    log_spec = _log10(lambda_max)
    alpha = pl.alpha
    if math.isfinite(alpha) and lambda_max > 0:
        # log10 Σ λ^alpha, computed as alpha·log10 λmax + log10 Σ (λ/λmax)^alpha to avoid overflow
        log_alpha_norm = alpha * log_spec + math.log10(float((evals / lambda_max).pow(alpha).sum()))
    else:
        log_alpha_norm = math.nan
    return LayerResult(
        name=name, kind=kind, shape=tuple(shape), n_evals=len(evals),
        alpha=alpha, alpha_err=pl.alpha_err, xmin=pl.xmin, D=pl.D, n_tail=pl.n_tail,
        lambda_max=lambda_max, fnorm2=fnorm2, alpha_weighted=alpha * log_spec,
        log_norm=_log10(fnorm2), log_spectral_norm=log_spec, log_alpha_norm=log_alpha_norm,
        stable_rank=fnorm2 / lambda_max if lambda_max > 0 else math.nan,
        status=pl.status, warning=warning,
    )


def summarize(rows: Sequence[LayerResult], fit: str) -> dict:
    """Model-level summary: alpha statistics over fitted layers and the layers outside the HT-SR bands.

    ``alpha_std`` is the population standard deviation (ddof 0) of the fitted alphas: how unevenly the
    layers are trained, the imbalance number of the model-balancing follow-up to TempBalance.

    ``over_trained``/``under_trained`` list layers only when ``fit`` is `BANDS_FIT`, the fit the bands were
    calibrated on; for any other fit they are ``None`` (JSON ``null``): no reading, rather than a wrong one.
    ``bands_fit`` names the fit the bands belong to.
    """
    fitted = [r for r in rows if r.status == "ok" and math.isfinite(r.alpha)]
    alphas = [r.alpha for r in fitted]
    weighted = [r.alpha_weighted for r in fitted if math.isfinite(r.alpha_weighted)]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "n_layers": len(rows),
        "n_fitted": len(fitted),
        "alpha_mean": statistics.fmean(alphas) if alphas else math.nan,
        "alpha_median": statistics.median(alphas) if alphas else math.nan,
        "alpha_std": statistics.pstdev(alphas) if alphas else math.nan,  # the spread across layers, ddof 0
        "alpha_weighted_mean": statistics.fmean(weighted) if weighted else math.nan,
        "over_trained": [r.name for r in fitted if r.alpha < OVER_TRAINED_BELOW] if fit == BANDS_FIT else None,
        "under_trained": [r.name for r in fitted if r.alpha > UNDER_TRAINED_ABOVE] if fit == BANDS_FIT else None,
        "bands_fit": BANDS_FIT,
        "status_counts": statuses,
    }


def band_flags(summary: dict, fit: str) -> tuple[list[str], list[str]] | None:
    """The layers the HT-SR bands flag, (possibly over-trained, possibly under-trained), or ``None`` when
    the alphas come from another fit than `BANDS_FIT`, on which the bands were not calibrated."""
    if fit != BANDS_FIT:
        return None
    return list(summary.get("over_trained") or []), list(summary.get("under_trained") or [])
