import math

import pytest
import torch

from tbdiag.esd.powerlaw import fit_ks, fit_median, fit_peak, hill_alphas, ks_distances
from tbdiag.esd.spectrum import eigenvalues


@pytest.fixture(scope="module")
def golden_evals() -> torch.Tensor:
    """docs/design.md ("The method, precisely"): W = randn(500, 250)/√250 right after torch.manual_seed(1)."""
    torch.manual_seed(1)
    w = torch.randn(500, 250) / math.sqrt(250)
    return eigenvalues(w[None])


def test_golden_spectrum(golden_evals):
    assert float(golden_evals[-1]) == pytest.approx(5.639239, rel=1e-5)
    assert float(golden_evals.sum()) == pytest.approx(502.2368, rel=1e-5)


def test_golden_fits(golden_evals):
    med = fit_median(golden_evals)
    assert med.alpha == pytest.approx(2.745714, rel=1e-5)
    assert med.D == pytest.approx(0.164852, rel=1e-5)
    assert med.n_tail == 125 and med.status == "ok"
    assert fit_ks(golden_evals).alpha == pytest.approx(5.945899, rel=1e-5)
    assert fit_peak(golden_evals, lower_bound_quirk=True).alpha == pytest.approx(3.570151, rel=1e-5)


def pareto(alpha: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return ((1 - u) ** (-1 / (alpha - 1))).sort().values  # density ∝ x^-alpha on [1, ∞)


@pytest.mark.parametrize("alpha", [1.8, 2.5, 4.0])
@pytest.mark.parametrize("fit", [fit_median, fit_ks])
def test_pareto_exponent_recovered(alpha, fit):
    res = fit(pareto(alpha, 4000, seed=int(alpha * 10)))
    assert res.status == "ok"
    assert abs(res.alpha - alpha) < 3 * res.alpha_err, (res.alpha, alpha, res.alpha_err)
    assert res.alpha_err == pytest.approx((res.alpha - 1) / math.sqrt(res.n_tail))


def test_ks_picks_alpha_at_argmin_D_of_a_plain_loop():
    ev = pareto(2.5, 300, seed=3) * torch.linspace(1, 1.5, 300, dtype=torch.float64)
    ev = ev.sort().values
    best = (math.inf, None)
    n_total = len(ev)
    for i in range(n_total - 1):  # straight from the formulas
        tail = ev[i:]
        n = len(tail)
        alpha = 1 + n / float(tail.log().sum() - n * math.log(ev[i]))
        k = torch.arange(n, dtype=torch.float64)
        D = float((1 - (tail / ev[i]) ** (1 - alpha) - k / n).abs().max())
        if D < best[0]:
            best = (D, alpha)
    res = fit_ks(ev)
    assert res.D == pytest.approx(best[0], rel=1e-9)
    assert res.alpha == pytest.approx(best[1], rel=1e-9)


def test_ks_distances_chunking_is_invisible(monkeypatch):
    ev = pareto(3.0, 500, seed=5)
    alphas = hill_alphas(ev)
    idx = torch.arange(499)
    whole = ks_distances(ev, alphas, idx)
    monkeypatch.setattr("tbdiag.esd.powerlaw.KS_CHUNK_ELEMENTS", 777)
    assert torch.allclose(ks_distances(ev, alphas, idx), whole, rtol=0, atol=1e-14)


def test_peak_lower_bound_restricts_candidates():
    ev = pareto(2.2, 1000, seed=8)
    quirk, proper = fit_peak(ev, lower_bound_quirk=True), fit_peak(ev)
    assert quirk.status == proper.status == "ok"
    assert proper.D >= quirk.D  # a subset of the quirk's candidates can only do as well or worse


@pytest.mark.parametrize("fit", [fit_median, fit_ks, fit_peak])
def test_degenerate_inputs_give_nan_and_status(fit):
    constant = fit(torch.ones(40, dtype=torch.float64))
    assert constant.status == "degenerate" and math.isnan(constant.alpha)
    single = fit(torch.ones(1, dtype=torch.float64))
    assert single.status == "too_few_evals" and math.isnan(single.D)


def brute_force_ks(ev: torch.Tensor, candidates: torch.Tensor) -> tuple[int, float]:
    alphas = hill_alphas(ev)
    candidates = candidates[torch.isfinite(alphas[candidates]) & (alphas[candidates] > 1)]
    D = ks_distances(ev, alphas, candidates)
    best = int(torch.argmin(D))
    return int(candidates[best]), float(D[best])


@pytest.mark.parametrize("seed", range(12))
def test_pruned_ks_search_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    n = [300, 1000, 2500][seed % 3]
    kind = seed % 4
    if kind == 0:  # Marchenko–Pastur bulk
        w = torch.randn(n, n // 2, generator=g, dtype=torch.float64)
        ev = torch.linalg.svdvals(w).square().sort().values
    elif kind == 1:  # pure power law
        ev = pareto(2.0 + seed / 5, n, seed)
    elif kind == 2:  # bulk plus a heavy tail
        ev = torch.cat([torch.rand(n, generator=g, dtype=torch.float64) + 0.5, pareto(2.5, n // 5, seed) * 2]).sort().values
    else:  # many repeated values (ties)
        ev = torch.randint(1, 40, (n,), generator=g).to(torch.float64).sort().values
    from tbdiag.esd.powerlaw import ks_argmin

    alphas = hill_alphas(ev)
    cand = torch.arange(len(ev) - 1)
    cand = cand[torch.isfinite(alphas[cand]) & (alphas[cand] > 1)]
    assert ks_argmin(ev, alphas, cand) == brute_force_ks(ev, torch.arange(len(ev) - 1))
