"""Tests that kill mutants the rest of the suite let survive (`benchmarks/mutation.sh`, README "Mutation
testing"), and the README claims about the math core that had no test. Each checks a documented formula or
rule on small inputs where the mutated code gives a different answer."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tbdiag import AnalyzeOptions, analyze
from tbdiag.io.checkpoint import order_metadata
from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import fused_axis, is_transposed_linear, kind_of_module, plan_layers
from tbdiag.esd.metrics import band_flags, layer_result, summarize
from tbdiag.esd.mp import matrix_entropy, mp_fit
from tbdiag.esd import powerlaw, spectrum
from tbdiag.esd.powerlaw import failed_fit, fit_ks, fit_median, fit_peak, hill_alphas, ks_bounds, ks_distances
from tbdiag.allocation.allocators import lora_ranks, peft_patterns, sparsity
from tbdiag.allocation.maps import check_ratios, multipliers, unit_means, unit_multipliers
from tbdiag.allocation.selection import (TuneOptions, plan_model, tensor_of, tuned_layers, unit_of_parameters,
                                      unwrap)
from tbdiag.io.tensors import Checkpoint, TensorRef
from tbdiag.train.schedules import cosine, warm_restarts

# --- allocation/maps.py ------------------------------------------------------------------------------------


def test_linear_map_spans_any_ratio_range():
    """m = lo + (v − v_min)/(v_max − v_min)·(hi − lo): with hi − lo ≠ 1 the span matters (0.5–1.5 hides it)."""
    v = [2.0, 3.0, 6.0]
    assert multipliers(v, "linear", 0.6, 1.4) == pytest.approx([0.6, 0.6 + 0.25 * 0.8, 1.4])
    assert multipliers(v, "linear", 0.2, 3.0) == pytest.approx([0.2, 0.2 + 0.25 * 2.8, 3.0])


def test_step_map_ties_share_their_average_rank():
    """README/maps docstring: values 1, 3, 3, 2 have ranks 0, 2.5, 2.5, 1; m = lo + (hi − lo)·r/n."""
    def step(v, lo=0.5, hi=1.5):
        return multipliers(v, "step", lo, hi)

    assert step([1.0, 3.0, 3.0, 2.0]) == pytest.approx([0.5, 0.5 + 2.5 / 4, 0.5 + 2.5 / 4, 0.5 + 1 / 4])
    assert step([2.0, 2.0, 5.0, 7.0]) == pytest.approx([0.5 + 0.5 / 4, 0.5 + 0.5 / 4, 0.5 + 2 / 4, 0.5 + 3 / 4])
    assert step([4.0, 4.0, 4.0, 1.0, 9.0]) == pytest.approx([0.5 + 2 / 5] * 3 + [0.5, 0.5 + 4 / 5])
    assert step([3.0, 3.0, 3.0]) == pytest.approx([0.5 + 1 / 3] * 3)
    assert step([1.0, 2.0, 3.0, 4.0], 0.6, 1.4) == pytest.approx([0.6, 0.8, 1.0, 1.2])
    # ties do not move the mean multiplier lo + (hi − lo)·(n − 1)/(2n)
    assert sum(step([1.0, 1.0, 2.0, 5.0, 5.0, 5.0])) / 6 == pytest.approx(0.5 + 5 / 12)


def test_sigmoid_map_uses_lo_below_and_hi_above_the_mean():
    """f = 2·log10(hi)·(σ(T·d) − ½) above the mean, 2·log10(1/lo)·(σ(T·d) − ½) below, T = 10, m = 10^f."""
    lo, hi = 0.5, 1.5
    v = [2.0, 2.1, 3.0, 4.9]  # mean 3: one value far below, one just below, one at, one far above
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = []
    for x in v:
        d = x - 3.0
        want.append(10 ** ((2 * math.log10(hi) if d > 0 else 2 * math.log10(1 / lo)) * (sig(10 * d) - 0.5)))
    got = multipliers(v, "sigmoid", lo, hi)
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(lo, rel=1e-3) and got[3] == pytest.approx(hi, rel=1e-3) and got[2] == 1.0


def test_sqrt_and_log2_refuse_values_they_cannot_map():
    with pytest.raises(TbdiagError, match=r"^map sqrt: needs positive metric values; use the linear map"):
        multipliers([0.0, 1.0, 4.0], "sqrt")
    assert multipliers([1.0, 4.0], "sqrt") == pytest.approx([2 / 3, 4 / 3])
    with pytest.raises(TbdiagError, match=r"^map log2: needs metric values above 1 \(alphas are\); use the linear"):
        multipliers([1.0, 2.0, 4.0], "log2")
    assert multipliers([2.0, 8.0], "log2") == pytest.approx([0.5, 1.5])


def test_ratio_and_map_checks_say_what_is_allowed():
    with pytest.raises(TbdiagError, match=r"^map 'cubic': unknown map; use one of linear, sqrt, log2, step, sigmoid$"):
        multipliers([2.0, 3.0], "cubic")
    for lo, hi in ((0.0, 1.5), (-0.5, 1.5), (1.5, 0.5), (math.nan, 1.5), (0.5, math.inf)):
        with pytest.raises(TbdiagError) as info:
            check_ratios(lo, hi)
        assert str(info.value).endswith("need finite numbers with 0 < min_ratio ≤ max_ratio; e.g. 0.5 and 1.5")
    check_ratios(1.0, 1.0)  # lo = hi is allowed


def test_unit_multipliers_map_each_units_finite_mean():
    means = unit_means(["a", "b", "a", "c", "c"], [2.0, 5.0, 4.0, math.nan, math.nan])
    assert list(means) == ["a", "b", "c"] and means["a"] == 3.0 and means["b"] == 5.0 and math.isnan(means["c"])
    # defaults: the linear map over 0.5–1.5; a unit without a finite value keeps 1
    assert unit_multipliers(["a", "b", "a", "c"], [2.0, 5.0, 4.0, math.nan]) == {"a": 0.5, "b": 1.5, "c": 1.0}
    got = unit_multipliers(["a", "b", "c"], [2.0, 4.0, 3.0], "linear", 0.7, 1.1)
    assert got == pytest.approx({"a": 0.7, "b": 1.1, "c": 0.9})


# --- README claims about the math core that had no test --------------------------------------------------


def _svd_evals(mats: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(mats.double()).square().flatten().sort().values


def test_conv_eigenvalues_are_scaled_by_conv_norm():
    """README: conv slices pooled into one spectrum, eigenvalues scaled by --conv-norm (0.5); linears not."""
    torch.manual_seed(0)
    conv, fc = torch.randn(16, 8, 3, 3), torch.randn(24, 16)
    ev_conv = _svd_evals(conv.permute(2, 3, 0, 1).reshape(9, 16, 8))  # 72 eigenvalues
    ev_fc = _svd_evals(fc[None])
    for options, scale in ((AnalyzeOptions(), 0.5), (AnalyzeOptions(conv_norm=1.0), 1.0),
                           (AnalyzeOptions(conv_norm=3.0), 3.0)):
        rows = {r.name: r for r in analyze({"conv.weight": conv, "fc.weight": fc}, options).layers}
        assert rows["conv"].n_evals == 72 and rows["conv"].status == "ok"
        assert rows["conv"].lambda_max == pytest.approx(scale * float(ev_conv[-1]), rel=1e-9)
        assert rows["conv"].fnorm2 == pytest.approx(scale * float(ev_conv.sum()), rel=1e-9)
        assert rows["fc"].lambda_max == pytest.approx(float(ev_fc[-1]), rel=1e-9)  # not a conv: unscaled


def test_numerical_zero_eigenvalues_are_left_out_of_the_fit():
    """README: eigenvalues at or below max(m,n)·ε·λ_max are numerical zeros, left out of the fit, counted in
    the row's warning; they still count in n_evals, λ_max and ‖W‖²_F."""
    torch.manual_seed(0)
    w = torch.randn(60, 12, dtype=torch.float64) @ torch.randn(12, 40, dtype=torch.float64)  # rank 12 of 40
    row = analyze({"fc.weight": w}, AnalyzeOptions(fit="median")).layers[0]
    ev = _svd_evals(w[None])
    assert row.status == "ok" and row.n_evals == 40
    assert row.warning == "28 zero eigenvalues left out of the fit"
    assert row.alpha == pytest.approx(fit_median(ev[-12:]).alpha, rel=1e-6) and row.n_tail == 6
    # "at or below": an eigenvalue exactly at zero_rtol·λ_max is a zero, one just above is not
    ev = torch.tensor([0.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 7.5, 8.0], dtype=torch.float64)
    at = layer_result("x", "linear", (10, 10), ev, zero_rtol=0.25)  # threshold 0.25·8 = 2
    assert at.warning == "2 zero eigenvalues left out of the fit" and at.n_tail == 4  # median of the 8 kept
    assert at.alpha == pytest.approx(fit_median(ev[2:]).alpha)
    above = layer_result("x", "linear", (10, 10), ev, zero_rtol=0.2499)
    assert above.warning == "1 zero eigenvalues left out of the fit" and above.n_tail == 5
    rank1 = layer_result("x", "linear", (10, 10), torch.tensor([0.0] * 9 + [8.0], dtype=torch.float64))
    assert rank1.status == "degenerate" and rank1.warning == "rank 1"


def test_third_party_safetensors_rows_come_in_natural_name_order(tmp_path):
    """README: safetensors files without tbdiag's order metadata give rows in natural name order."""
    torch.manual_seed(0)
    names = ["layers.10.fc", "layers.2.fc", "head", "layers.1.fc"]
    state = {f"{n}.weight": torch.randn(12, 10) for n in names}
    save_file(state, tmp_path / "plain.safetensors")
    rows = [r.name for r in analyze(tmp_path / "plain.safetensors").layers]
    assert rows == ["head", "layers.1.fc", "layers.2.fc", "layers.10.fc"]
    save_file(state, tmp_path / "ordered.safetensors", metadata=order_metadata(list(state)))
    assert [r.name for r in analyze(tmp_path / "ordered.safetensors").layers] == names  # model order kept


def test_cosine_and_sgdr_schedule_values():
    """docs/design.md ("The method, precisely"): lr(e) = lr₀·½(1 + cos(π·e/E)); SGDR restarts after period, then period·mult …"""
    assert [cosine(e, 200) for e in (0, 50, 100, 150, 200, 250)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0, 0.0], abs=1e-15)
    # period 10, mult 2: restarts at epochs 10, 30, 70
    for epoch, (start, length) in {0: (0, 10), 5: (0, 10), 9: (0, 10), 10: (10, 20), 20: (10, 20), 29: (10, 20),
                                   30: (30, 40), 69: (30, 40), 70: (70, 80)}.items():
        want = 0.5 * (1 + math.cos(math.pi * (epoch - start) / length))
        assert warm_restarts(epoch, 10, 2) == pytest.approx(want, abs=1e-15), epoch
    assert warm_restarts(5) == pytest.approx(0.5) and warm_restarts(10) == 1.0  # defaults 10 and 2
    assert [warm_restarts(e, 4, 1) for e in (0, 2, 4, 6, 8)] == pytest.approx([1.0, 0.5, 1.0, 0.5, 1.0])


def test_recommend_unit_block_and_metric_spectral_norm(tmp_path):
    """README: recommend --unit block gives one multiplier per block, from the mean of --metric over its
    layers (spectral_norm = λ_max), linearly mapped onto --min-ratio … --max-ratio."""
    from typer.testing import CliRunner

    from tbdiag.cli import app

    torch.manual_seed(0)
    state = {"stem.weight": torch.randn(64, 32)}
    for b, scale in ((0, 1.0), (1, 3.0), (2, 2.0)):
        state[f"blocks.{b}.q.weight"] = torch.randn(64, 64) * scale
        state[f"blocks.{b}.up.weight"] = torch.randn(128, 64) * scale
    state["head.weight"] = torch.randn(10, 64)
    path = tmp_path / "m.safetensors"
    save_file(state, path, metadata=order_metadata(list(state)))
    out = tmp_path / "mult.json"
    res = CliRunner().invoke(app, ["recommend", str(path), "--unit", "block", "--metric", "spectral_norm",
                                   "--min-ratio", "0.6", "--max-ratio", "1.2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["unit"] == "block" and doc["metric"] == "spectral_norm" and list(doc["layers"]) == [
        "blocks.0", "blocks.1", "blocks.2"]
    rows = {r.name: r for r in analyze(path, fit="median").layers}
    means = [(rows[f"blocks.{b}.q"].lambda_max + rows[f"blocks.{b}.up"].lambda_max) / 2 for b in range(3)]
    for b, g in enumerate(doc["layers"].values()):
        assert g["layers"] == [f"blocks.{b}.q", f"blocks.{b}.up"]
        assert g["value"] == pytest.approx(means[b], rel=1e-9)
        assert g["multiplier"] == pytest.approx(0.6 + (means[b] - min(means)) / (max(means) - min(means)) * 0.6)
    assert doc["layers"]["blocks.0"]["multiplier"] == pytest.approx(0.6)
    assert doc["layers"]["blocks.1"]["multiplier"] == pytest.approx(1.2)


# --- powerlaw.py ----------------------------------------------------------------------------------------------


def _plain_fit(ev: torch.Tensor, candidates) -> tuple[int, float, float] | None:
    """(index, alpha, D) of the smallest KS distance over the candidate xmin indices, straight from
    docs/design.md ("The method, precisely") (a constant tail, whose alpha is infinite, is no candidate)."""
    best = None
    for i in candidates:
        tail = ev[i:]
        n = len(tail)
        s = float(tail.log().sum()) - n * math.log(float(ev[i]))
        if s <= 0:
            continue
        alpha = 1 + n / s
        k = torch.arange(n, dtype=torch.float64)
        D = float((1 - (tail / ev[i]) ** (1 - alpha) - k / n).abs().max())
        if best is None or D < best[2]:
            best = (i, alpha, D)
    return best


def _peak(ev: torch.Tensor, bins: int = 100) -> float:
    """xmin₂ of the peak fit: 10^(left edge of the fullest of ``bins`` bins of log10 λ over [min, max])."""
    lg = np.log10(ev.numpy())
    counts, edges = np.histogram(lg, bins=bins, range=(lg[0], lg[-1]))
    return float(10 ** edges[np.argmax(counts)])


def _window(ev: torch.Tensor, lo: float, hi: float) -> list[int]:
    return [i for i in range(len(ev) - 1) if lo <= float(ev[i]) <= hi]


def _assert_fit(fit, ev: torch.Tensor, expected: tuple[int, float, float]) -> None:
    i, alpha, D = expected
    assert fit.status == "ok" and fit.xmin == float(ev[i]) and fit.n_tail == len(ev) - i
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.D == pytest.approx(D, rel=1e-9)
    assert fit.alpha_err == pytest.approx((alpha - 1) / math.sqrt(len(ev) - i), rel=1e-9)


def test_a_failed_fit_is_nan_with_an_empty_tail():
    for fit in (failed_fit("degenerate"), fit_ks(torch.ones(1, dtype=torch.float64)),
                fit_median(torch.ones(30, dtype=torch.float64))):
        assert all(math.isnan(x) for x in (fit.alpha, fit.alpha_err, fit.xmin, fit.D)) and fit.n_tail == 0
    assert failed_fit("degenerate").status == "degenerate"


def test_two_eigenvalues_are_enough_for_every_fit():
    ev = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for fit in (fit_median, fit_ks, fit_peak):
        _assert_fit(fit(ev), ev, (0, 1 + 2 / math.log(2), 1 - math.exp(-2) - 0.5))


def test_median_fit_index_is_n_over_xmin_pos_capped_at_the_last_pair():
    """i = ⌊N / xmin_pos⌋ (xmin_pos ≥ 1), at most N − 2 so that the tail keeps two eigenvalues."""
    ev = torch.exp(torch.linspace(0, 3, 11, dtype=torch.float64)) * torch.linspace(1, 1.3, 11, dtype=torch.float64)
    for xmin_pos, i in ((2.0, 5), (4.0, 2), (1.5, 7), (1.0, 9), (1.05, 9), (11.0, 1), (12.0, 0)):
        _assert_fit(fit_median(ev, xmin_pos=xmin_pos), ev, _plain_fit(ev, [i]))


def test_ks_fit_takes_every_candidate_up_to_the_last_pair():
    """Candidates λ₀ … λ_{N−2}: on [1, 10, 11] the best is the last pair (D = 1 − e⁻² − ½ beats 0.44)."""
    ev = torch.tensor([1.0, 10.0, 11.0], dtype=torch.float64)
    assert _plain_fit(ev, range(2))[0] == 1
    _assert_fit(fit_ks(ev), ev, _plain_fit(ev, range(2)))
    g = torch.Generator().manual_seed(0)
    for n in range(3, 40, 3):
        ev = torch.exp(2 * torch.randn(n, generator=g, dtype=torch.float64)).sort().values
        _assert_fit(fit_ks(ev), ev, _plain_fit(ev, range(n - 1)))


def test_ks_fit_skips_constant_tails_and_finds_alphas_below_two():
    ev = torch.tensor([1.0, 1.5, 2.2, 3.0, 4.1, 7.0, 7.0, 7.0], dtype=torch.float64)  # the top tails are constant
    _assert_fit(fit_ks(ev), ev, _plain_fit(ev, range(7)))
    u = torch.rand(600, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    heavy = ((1 - u) ** (-1 / 0.5)).sort().values  # Pareto, alpha 1.5
    fit = fit_ks(heavy)
    assert fit.alpha < 2 and abs(fit.alpha - 1.5) < 3 * fit.alpha_err
    _assert_fit(fit, heavy, _plain_fit(heavy, range(599)))


def _plain_bounds(ev: torch.Tensor, alphas: torch.Tensor, i: int, points: int) -> tuple[float, float]:
    """ks_bounds' documented bounds for candidate i: the gaps at ``points`` evenly spread tail positions
    (first and last included) and, between neighbours p < q, cdf(q) − emp(p) and emp(q) − cdf(p)."""
    n = len(ev) - i
    pos = [math.floor(f * (n - 1)) for f in torch.linspace(0, 1, points, dtype=torch.float64).tolist()]
    a = float(alphas[i])
    cdf = [1 - (float(ev[i + k]) / float(ev[i])) ** (1 - a) for k in pos]
    emp = [k / n for k in pos]
    lower = max(abs(c - e) for c, e in zip(cdf, emp))
    ends = [cdf[j + 1] - emp[j] for j in range(points - 1)] + [emp[j + 1] - cdf[j] for j in range(points - 1)]
    return lower, max(lower, max(ends))


def test_ks_bounds_bracket_the_distance_as_documented():
    g = torch.Generator().manual_seed(1)
    ev = torch.linalg.svdvals(torch.randn(300, 120, generator=g, dtype=torch.float64)).square().sort().values
    alphas = hill_alphas(ev)
    idx = torch.arange(0, 110)
    D = ks_distances(ev, alphas, idx)
    for points in (5, 32):
        lower, upper = ks_bounds(ev, alphas, idx, points)
        assert bool((lower <= D + 1e-12).all()) and bool((D <= upper + 1e-12).all())
        for i in (0, 7, 60, 109):
            want = _plain_bounds(ev, alphas, i, points)
            assert (float(lower[i]), float(upper[i])) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_ks_search_scans_only_the_candidates_the_bounds_cannot_discard(monkeypatch):
    """README: bounds from 32, then 256 points discard candidates; only the survivors get the full scan."""
    g = torch.Generator().manual_seed(3)
    ev = torch.linalg.svdvals(torch.randn(1000, 400, generator=g, dtype=torch.float64)).square().sort().values
    scanned = []
    full = powerlaw.ks_distances
    monkeypatch.setattr(powerlaw, "ks_distances", lambda e, a, idx: scanned.append(len(idx)) or full(e, a, idx))
    fit = fit_ks(ev)
    assert len(scanned) == 1 and 0 < scanned[0] < 200  # of 399 candidates
    monkeypatch.setattr(powerlaw, "ks_distances", full)
    assert fit.D == pytest.approx(float(ks_distances(ev, hill_alphas(ev), torch.arange(399)).min()), rel=1e-12)


def test_peak_fit_searches_between_095_and_15_of_the_peak():
    """docs/design.md ("The method, precisely"): KS search over xmin in [0.95·xmin₂, 1.5·xmin₂]; the quirk compares log10(0.95·xmin₂)
    with raw eigenvalues instead. On this Marchenko–Pastur spectrum the two give different fits."""
    g = torch.Generator().manual_seed(0)
    ev = torch.linalg.svdvals(torch.randn(60, 30, generator=g, dtype=torch.float64)).square().sort().values
    p = _peak(ev)
    proper = fit_peak(ev)
    _assert_fit(proper, ev, _plain_fit(ev, _window(ev, 0.95 * p, 1.5 * p)))
    assert 0.95 * p <= proper.xmin <= 1.5 * p
    quirk = fit_peak(ev, lower_bound_quirk=True)
    _assert_fit(quirk, ev, _plain_fit(ev, _window(ev, math.log10(0.95 * p), 1.5 * p)))
    assert quirk.xmin < 0.95 * p and quirk.alpha != pytest.approx(proper.alpha)
    # bins: 10 put the peak elsewhere
    p10 = _peak(ev, 10)
    _assert_fit(fit_peak(ev, bins=10), ev, _plain_fit(ev, _window(ev, 0.95 * p10, 1.5 * p10)))
    assert fit_peak(ev, bins=10).xmin != proper.xmin
    # a log-uniform spectrum, where the quirk's bound does cut (log10(0.95·xmin₂) > λ₀)
    wide = torch.exp(6 * torch.rand(50, generator=torch.Generator().manual_seed(35), dtype=torch.float64)).sort().values
    p = _peak(wide)
    assert math.log10(0.95 * p) > float(wide[0])
    quirk = fit_peak(wide, lower_bound_quirk=True)
    _assert_fit(quirk, wide, _plain_fit(wide, _window(wide, math.log10(0.95 * p), 1.5 * p)))
    assert quirk.xmin != _plain_fit(wide, _window(wide, 0, 1.5 * p))[0]


def test_peak_window_is_closed_and_falls_back_to_every_candidate():
    def exact_peak(ev: torch.Tensor) -> float:  # _peak to the last bit, as torch computes it
        lg = ev.log10()
        counts = torch.histc(lg, bins=100, min=float(lg[0]), max=float(lg[-1]))
        return 10 ** float(torch.linspace(float(lg[0]), float(lg[-1]), 101, dtype=ev.dtype)[int(counts.argmax())])

    for seed, bound in ((0, 0.95), (41, 1.5)):  # a spectrum plus one eigenvalue exactly at the bound
        g = torch.Generator().manual_seed(seed)
        ev = torch.linalg.svdvals(torch.randn(60, 30, generator=g, dtype=torch.float64)).square().sort().values
        p = exact_peak(ev)
        assert p == pytest.approx(_peak(ev), rel=1e-12)
        at = torch.cat([ev, torch.tensor([bound * p], dtype=torch.float64)]).sort().values
        assert exact_peak(at) == p and fit_peak(at).xmin == bound * p  # the bound itself is a candidate
    # no eigenvalue in the window (bins wider than it): every candidate, as the ks fit
    gap = torch.tensor([1.0, 1.1, 1.2, 100.0, 110.0, 120.0, 130.0, 10000.0], dtype=torch.float64)
    assert not _window(gap, 0.95 * _peak(gap, 3), 1.5 * _peak(gap, 3))
    assert fit_peak(gap, bins=3) == fit_ks(gap) and fit_ks(gap).xmin == 120.0
    ev = torch.tensor([1.0, 10.0, 11.0], dtype=torch.float64)
    _assert_fit(fit_peak(ev, bins=2), ev, (1, *_plain_fit(ev, [1])[1:]))  # fallback includes λ_{N−2}


# --- metrics.py -------------------------------------------------------------------------------------------------


def _evals(m: int, n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _svd_evals(torch.randn(1, m, n, generator=g, dtype=torch.float64) * scale)


def test_every_field_of_a_fitted_row():
    """§2's metrics on a layer whose λ_max and Σλ are below 1 (negative logs are values, not nan)."""
    ev = _evals(40, 60, scale=0.01)  # a wide layer: 40 eigenvalues
    lmax, s = float(ev[-1]), float(ev.sum())
    assert lmax < 1 and s < 1
    r = layer_result("blk.fc", "linear", (40, 60), ev, fit="median", fit_kwargs={"xmin_pos": 4})
    fit = fit_median(ev, xmin_pos=4)
    assert (r.name, r.kind, r.shape, r.n_evals, r.status, r.warning) == ("blk.fc", "linear", (40, 60), 40, "ok", "")
    assert (r.alpha, r.alpha_err, r.xmin, r.D, r.n_tail) == (fit.alpha, fit.alpha_err, fit.xmin, fit.D, 30)
    assert r.lambda_max == lmax and r.fnorm2 == pytest.approx(s, rel=1e-12)
    assert r.log_spectral_norm == pytest.approx(math.log10(lmax)) and r.log_norm == pytest.approx(math.log10(s))
    assert r.alpha_weighted == pytest.approx(r.alpha * math.log10(lmax))
    assert r.log_alpha_norm == pytest.approx(math.log10(float((ev ** r.alpha).sum())), rel=1e-12)
    assert r.stable_rank == pytest.approx(s / lmax)
    # the Marchenko–Pastur fields of a wide layer use n = 60, m = 40
    mp = mp_fit(ev.numpy(), 60, 40)
    assert (r.mp_sigma, r.mp_bulk_max, r.num_spikes, r.mp_softrank) == (mp.sigma, mp.bulk_max, mp.num_spikes,
                                                                        mp.softrank)
    assert r.matrix_entropy == matrix_entropy(ev.numpy(), 60)


def test_min_evals_and_rank_decide_whether_a_layer_is_fitted():
    ev = _evals(10, 30)  # 10 eigenvalues
    assert layer_result("x", "linear", (10, 30), ev).status == "ok"  # min_evals defaults to 10
    assert math.isfinite(layer_result("x", "linear", (10, 30), ev).mp_sigma)  # the MP fit too (≥ min_evals)
    few = layer_result("x", "linear", (9, 30), ev[1:])
    assert few.status == "too_few_evals" and math.isnan(few.alpha) and few.lambda_max == float(ev[-1])
    assert math.isnan(few.mp_sigma) and few.num_spikes is None and math.isfinite(few.matrix_entropy)
    assert layer_result("x", "linear", (10, 30), ev, min_evals=11).status == "too_few_evals"
    one = layer_result("x", "linear", (1, 30), ev[-1:])
    assert one.status == "too_few_evals" and one.n_evals == 1 and one.lambda_max == float(ev[-1])
    two = torch.tensor([0.0] * 8 + [1.0, 2.0], dtype=torch.float64)  # rank 2: fitted on its two eigenvalues
    r = layer_result("x", "linear", (10, 10), two)
    assert r.status == "ok" and r.n_tail == 2 and r.warning == "8 zero eigenvalues left out of the fit"
    zero = layer_result("x", "linear", (10, 10), torch.zeros(10, dtype=torch.float64))
    assert zero.status == "zero_matrix" and zero.lambda_max == 0 and math.isnan(zero.stable_rank)
    assert math.isnan(zero.log_spectral_norm) and math.isnan(zero.log_alpha_norm)


def test_a_non_finite_or_empty_layer_is_all_nan():
    for ev in (torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64), torch.zeros(0, dtype=torch.float64)):
        r = layer_result("w", "conv2d", (3, 4, 1, 1), ev)
        assert (r.name, r.kind, r.shape, r.n_evals, r.n_tail) == ("w", "conv2d", (3, 4, 1, 1), len(ev), 0)
        assert (r.status, r.warning) == ("non_finite", "weights contain nan or inf")
        values = (r.alpha, r.alpha_err, r.xmin, r.D, r.lambda_max, r.fnorm2, r.alpha_weighted, r.log_norm,
                  r.log_spectral_norm, r.log_alpha_norm, r.stable_rank)
        assert all(isinstance(v, float) and math.isnan(v) for v in values)


def _row_with(alpha: float, status: str = "ok", name: str = "x", lambda_max: float = 10.0):
    base = layer_result(name, "linear", (20, 20), _evals(20, 20))
    if status != "ok":
        return dataclasses.replace(base, status=status, alpha=math.nan, alpha_weighted=math.nan)
    return dataclasses.replace(base, alpha=alpha, lambda_max=lambda_max, alpha_weighted=alpha * math.log10(lambda_max))


def test_summary_statistics_bands_and_status_counts():
    rows = [_row_with(2.0, name="a"), _row_with(1.5, name="b"), _row_with(6.5, name="c"), _row_with(6.0, name="d"),
            _row_with(math.nan, "too_few_evals", "e"), _row_with(math.nan, "degenerate", "f"),
            _row_with(math.nan, "degenerate", "g")]
    s = summarize(rows, "ks")
    alphas = [2.0, 1.5, 6.5, 6.0]
    assert s == {"n_layers": 7, "n_fitted": 4, "alpha_mean": pytest.approx(sum(alphas) / 4),
                 "alpha_median": pytest.approx(4.0), "alpha_weighted_mean": pytest.approx(sum(alphas) / 4),
                 "alpha_std": pytest.approx(math.sqrt(20.5 / 4)),  # ddof 0: squared deviations 4 + 6.25 + 6.25 + 4
                 "over_trained": ["b"], "under_trained": ["c"],  # 2.0 and 6.0 are inside the bands
                 "bands_fit": "ks", "status_counts": {"ok": 4, "too_few_evals": 1, "degenerate": 2}}
    assert summarize(rows, "median") == {**s, "over_trained": None, "under_trained": None}  # no reading, not a wrong one
    empty = summarize([_row_with(math.nan, "degenerate")], "ks")
    assert empty["n_fitted"] == 0 and math.isnan(empty["alpha_mean"]) and math.isnan(empty["alpha_median"])
    assert math.isnan(empty["alpha_weighted_mean"]) and empty["status_counts"] == {"degenerate": 1}
    assert math.isnan(empty["alpha_std"]) and summarize([_row_with(3.0)], "ks")["alpha_std"] == 0.0


def test_band_flags_only_for_the_fit_they_were_calibrated_on():
    s = summarize([_row_with(1.5, name="low"), _row_with(7.0, name="high"), _row_with(3.0, name="mid")], "ks")
    assert band_flags(s, "ks") == (["low"], ["high"])
    assert band_flags(s, "median") is None and band_flags(s, "peak") is None
    assert band_flags({}, "ks") == ([], []) and band_flags({"over_trained": None}, "ks") == ([], [])


# --- allocation/selection.py -----------------------------------------------------------------------------------


def _units(model: nn.Module, unit: str = "layer", **options) -> tuple[list[str], dict[str, str]]:
    """(tuned layer names, {parameter: unit}) as TempBalance decides them for a live model."""
    opts = TuneOptions(unit=unit, **options)
    specs = plan_model(model, opts)
    tuned = tuned_layers(specs, opts)
    return [t.name for t in tuned], unit_of_parameters(model, tuned, specs, unit)


class _ConvNet(nn.Module):
    """Module order decides which BatchNorm joins which tuned conv."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)  # before any layer: default
        self.stem = nn.Conv2d(3, 16, 3)  # the first layer: not tuned
        self.bn0 = nn.BatchNorm2d(16)  # after a conv that is not tuned: default
        self.c1 = nn.Conv2d(16, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)  # directly after c1: c1's group
        self.bn1b = nn.BatchNorm2d(16)  # a second one: default
        self.c2 = nn.Conv2d(16, 16, 3)
        self.act = nn.ReLU()  # no parameters: does not come between
        self.bn2 = nn.BatchNorm2d(16)  # c2's group
        self.c3 = nn.Conv2d(16, 16, 3)
        self.prelu = nn.PReLU()  # a module with parameters does
        self.bn3 = nn.BatchNorm2d(16)  # default
        self.head = nn.Linear(16, 10)  # the last layer: not tuned


def test_a_batchnorm_joins_the_tuned_conv_it_directly_follows():
    torch.manual_seed(0)
    tuned, units = _units(_ConvNet())
    assert tuned == ["c1", "c2", "c3"]
    assert units == {f"{m}.{p}": u for m, u in (("c1", "c1"), ("bn1", "c1"), ("c2", "c2"), ("bn2", "c2"),
                                                ("c3", "c3")) for p in ("weight", "bias")}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(64)
        self.small = nn.Linear(64, 4)  # 4 eigenvalues: a candidate that is not tuned
        self.emb = nn.Embedding(100, 64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.post_bn = nn.BatchNorm1d(64)  # right after blocks.1.fc2, outside the blocks
        self.ln_f = nn.LayerNorm(64)
        self.head = nn.Linear(64, 5)


def test_block_unit_takes_every_parameter_of_the_block_but_untuned_layers():
    torch.manual_seed(0)
    tuned, units = _units(_Stack(), "block")
    assert tuned == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    want = {f"blocks.{b}.{m}.{p}": f"blocks.{b}" for b in (0, 1) for m in ("ln", "fc1", "fc2")
            for p in ("weight", "bias")}
    want |= {f"blocks.{b}.emb.weight": f"blocks.{b}" for b in (0, 1)}
    assert units == want  # not blocks.*.small (a layer left at the global rate), post_bn, ln_f, embed, head
    tuned, units = _units(_Stack(), "block", embeddings=True)  # embeddings on request
    assert tuned == ["blocks.0.emb", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.emb", "blocks.1.fc1", "blocks.1.fc2"]
    assert units == want
    tuned, units = _units(_Stack(), "layer", embeddings=True)
    assert "blocks.0.emb" in tuned and units["blocks.0.emb.weight"] == "blocks.0.emb"


class _Gated(nn.Linear):
    """A linear layer with a norm of its own (a numbered module that is a layer and has children)."""

    def __init__(self) -> None:
        super().__init__(64, 64)
        self.norm = nn.LayerNorm(64)


def test_layer_unit_never_gives_a_norm_to_a_layer_and_root_parameters_keep_their_names():
    torch.manual_seed(0)
    model = nn.Sequential(*[_Gated() for _ in range(3)])
    tuned, units = _units(model)
    assert tuned == ["1"] and units == {"1.weight": "1", "1.bias": "1"}  # not 1.norm.*
    tuned, units = _units(nn.Linear(64, 64), include_first_last=True)  # the model is the layer
    assert tuned == ["weight"] and units == {"weight": "weight", "bias": "weight"}


def test_tuned_layers_take_embeddings_only_on_request():
    rows = [SimpleNamespace(name=n, kind=k, n_evals=64) for n, k in (
        ("stem", "linear"), ("blocks.0.emb", "embedding"), ("blocks.0.fc", "linear"), ("blocks.0.rnn", "rnn"),
        ("blocks.1.conv", "conv2d"), ("head", "linear"))]
    assert [t.name for t in tuned_layers(rows)] == ["blocks.0.fc", "blocks.1.conv"]
    assert [t.name for t in tuned_layers(rows, TuneOptions(embeddings=True))] == [
        "blocks.0.emb", "blocks.0.fc", "blocks.1.conv"]


def test_tuned_layers_filter_by_eigenvalue_count_and_globs():
    rows = [SimpleNamespace(name=n, kind="linear", n_evals=e) for n, e in (
        ("stem", 64), ("blocks.0.q", 50), ("blocks.0.k", 49), ("blocks.1.q", 64), ("blocks.1.up", 64), ("head", 64))]
    assert [t.name for t in tuned_layers(rows)] == ["blocks.0.q", "blocks.1.q", "blocks.1.up"]  # ≥ 50 eigenvalues
    only = TuneOptions(include=("blocks.1.*",), exclude=("*.up",))
    assert [t.name for t in tuned_layers(rows, only)] == ["blocks.1.q"]
    assert [t.name for t in tuned_layers(rows, TuneOptions(exclude=("*.q",)))] == ["blocks.1.up"]
    with pytest.raises(TbdiagError) as info:
        TuneOptions(unit="blocks")
    assert str(info.value) == "unit 'blocks': use one of layer, block"
    with pytest.raises(TbdiagError) as info:
        TuneOptions(min_evals=1)
    assert str(info.value) == "min_evals 1: must be at least 2 (a fit needs 2 eigenvalues)"


def test_tensor_of_a_layer_known_by_name():
    assert tensor_of("fc") == "fc.weight" and tensor_of("blocks.0.attn.q") == "blocks.0.attn.q.weight"
    assert tensor_of("h.0.attn.c_attn.k") == "h.0.attn.c_attn.weight"  # a part of a split fused matrix
    assert tensor_of("h.0.qkv.proj") == "h.0.qkv.proj.weight"  # under a fused name, but no part of it
    assert tensor_of("attn.in_proj_weight") == "attn.in_proj_weight"
    assert tensor_of("mlp.experts.gate_up_proj.3") == "mlp.experts.gate_up_proj"  # expert 3 of a stack
    assert tensor_of("moe.Experts.down.0") == "moe.Experts.down"
    assert tensor_of("mlp.experts.3") == "mlp.experts.3.weight"  # a module per expert
    assert tensor_of("layers.3") == "layers.3.weight"


def test_unwrap_finds_the_model_inside_wrappers():
    class Compiled(nn.Module):  # what torch.compile returns: the model under _orig_mod
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    model = nn.Linear(4, 4)
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(Compiled(nn.DataParallel(Compiled(model)))) is model


# --- spectrum.py ------------------------------------------------------------------------------------------------


def test_gram_is_the_smaller_gram_matrix_whatever_the_blocks():
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 7, 5), (2, 5, 7), (2, 6, 6)):  # tall: WᵀW; wide: WWᵀ; square: WᵀW (not WWᵀ)
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        want = w.mT @ w if shape[1] >= shape[2] else w @ w.mT
        for chunk in (None, 1, 7, 1000):
            got = spectrum.gram(w, chunk_elements=chunk)  # full by default, on the CPU by default
            assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12), (shape, chunk)
        lower = spectrum.gram(w, "cpu", full=False)
        assert torch.allclose(lower.tril(), want.tril(), rtol=1e-12, atol=1e-12)
    w = torch.randn(1, 600, 300, generator=g, dtype=torch.float64)  # two column panels, mirrored up
    assert torch.allclose(spectrum.gram(w), w.mT @ w, rtol=1e-10, atol=1e-10)


def test_gram_panels_and_their_cost():
    """Panels of max(256, r // 8) columns over the lower triangle; gram_macs counts their multiply-adds."""
    assert spectrum.panels(100) == [(0, 100)] and spectrum.panels(256) == [(0, 256)]
    assert spectrum.panels(300) == [(0, 256), (256, 300)]
    assert spectrum.panels(2100) == [(i, min(i + 262, 2100)) for i in range(0, 2100, 262)]
    assert spectrum.panels(4096) == [(i, i + 512) for i in range(0, 4096, 512)]
    for m, n in ((100, 40), (40, 100), (1000, 300), (4096, 4096), (300, 5000)):
        r = min(m, n)
        want = max(m, n) * sum((r - i0) * (i1 - i0) for i0, i1 in spectrum.panels(r))
        assert spectrum.gram_macs(m, n) == want
    assert spectrum.gram_macs(100, 40) == 100 * 40 * 40  # one panel: the whole square
    assert spectrum.gram_macs(300, 5000) == 5000 * (300 * 256 + 44 * 44)
    assert spectrum.gram_macs(8192, 8192) / 8192 ** 3 == pytest.approx(9 / 16, abs=0.01)


def test_eigenvalues_pool_every_batch_and_a_bad_batch_spoils_all(monkeypatch):
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(4, 30, 20, generator=g)
    whole = spectrum.eigenvalues(mats)
    monkeypatch.setattr(spectrum, "BATCH_BYTES", 3 * 20 * 20 * 8 * 2)  # two matrices a batch: two batches
    two = spectrum.eigenvalues(mats)
    assert two.shape == (80,) and torch.allclose(two, whole, rtol=1e-12, atol=1e-12)
    rows = torch.randn(5, 1, 6, generator=g)  # 1×6 matrices: one eigenvalue each
    monkeypatch.setattr(spectrum, "BATCH_BYTES", 3 * 8)  # one matrix a batch
    rows[2, 0, 3] = math.inf
    assert bool(spectrum.eigenvalues(rows).isnan().all())
    bad = spectrum.gram_eigenvalues([spectrum.gram(torch.full((3, 4, 4), math.nan), full=False)])[0]
    assert bad.shape == (12,) and bad.dtype == torch.float64 and bool(bad.isnan().all())
    ev = spectrum.eigenvalues_svd(mats)  # float32 weights: the reference is still float64
    assert ev.dtype == torch.float64 and torch.allclose(ev, whole, rtol=1e-9, atol=1e-9)


def test_one_stack_of_eigensolves_is_shared_over_threads(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 30, generator=g, dtype=torch.float64)
    grams = w.mT @ w
    calls = []
    monkeypatch.setattr(spectrum, "ThreadPoolExecutor", lambda n: calls.append(n) or ThreadPoolExecutor(n))
    monkeypatch.setattr(spectrum, "PARALLEL_MIN_WORK", 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = spectrum.eigvalsh_shared([grams])  # a single stack of three matrices
        assert calls == [2] and torch.allclose(got[0], torch.linalg.eigvalsh(grams), rtol=1e-12, atol=1e-9)
        spectrum.eigvalsh_shared([grams[:2]])  # two matrices: shared
        assert calls == [2, 2]
        spectrum.eigvalsh_shared([grams[:1]])  # one matrix: nothing to share
        assert calls == [2, 2]
        monkeypatch.setattr(spectrum, "PARALLEL_MIN_WORK", 3 * 30 ** 3)  # just enough work
        spectrum.eigvalsh_shared([grams])
        assert calls == [2, 2, 2]
        monkeypatch.setattr(spectrum, "PARALLEL_MIN_WORK", 3 * 30 ** 3 + 1)  # not enough work: one call
        spectrum.eigvalsh_shared([grams])
        torch.set_num_threads(1)
        monkeypatch.setattr(spectrum, "PARALLEL_MIN_WORK", 1)
        spectrum.eigvalsh_shared([grams])  # one thread: nothing to share
        assert calls == [2, 2, 2]
    finally:
        torch.set_num_threads(before)


def test_devices_and_their_messages(monkeypatch):
    assert spectrum.resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for spec, words in (("gpu0", "not a device"), ("meta", "only cpu and cuda are supported")):
        with pytest.raises(TbdiagError) as info:
            spectrum.resolve_device(spec)
        assert info.value.cli_message().startswith(f"--device {spec}: {words}; use auto, cpu, cuda or cuda:N")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TbdiagError) as info:
        spectrum.resolve_device("cuda")
    assert info.value.cli_message() == "--device cuda: no CUDA GPU is available here; use --device cpu or auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs (the sizing only, no CUDA needed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert spectrum.resolve_device("auto") == torch.device("cuda")
    assert spectrum.resolve_device("cuda") == torch.device("cuda")
    assert spectrum.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(TbdiagError) as info:
        spectrum.resolve_device("cuda:2")
    assert info.value.cli_message() == "--device cuda:2: this machine has 2 GPU(s); use cuda:0 … cuda:1"
    free = (8 << 30) + 3  # not a multiple of the divisors: the sizes stay integers
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 16 << 30))
    blocks = spectrum.block_elements(torch.device("cuda"), torch.float64)
    batch = spectrum.batch_matrices(4096, torch.device("cuda"), torch.float64)
    assert (blocks, batch) == (free // 4 // 8, free // 2 // (3 * 4096 * 4096 * 8))
    assert type(blocks) is int and type(batch) is int


def test_release_memory_trims_the_heap_when_libc_is_there(monkeypatch):
    trims = []
    monkeypatch.setattr(spectrum, "_LIBC", SimpleNamespace(malloc_trim=trims.append))
    spectrum.release_memory()
    assert trims == [0]
    monkeypatch.setattr(spectrum, "_LIBC", None)
    spectrum.release_memory()  # no libc (macOS, musl): nothing to do
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert spectrum._libc() is not None


def test_farms_windows_are_evenly_spread_and_clipped():
    """rows = window or max(2, min(m, n) // 2), cols = rows·ratio, both within the matrix; per side
    min(per_dim, free positions + 1) starts, evenly spread and rounded; windows in row-major start order."""
    mats = torch.arange(2 * 10 * 8, dtype=torch.float64).reshape(2, 10, 8)

    def expect(rows, cols, starts_r, starts_c):
        return torch.cat([mats[:, i:i + rows, j:j + cols] for i in starts_r for j in starts_c])

    assert torch.equal(spectrum.farms_windows(mats), expect(4, 4, [0, 2, 4, 6], [0, 1, 3, 4]))
    assert torch.equal(spectrum.farms_windows(mats, window=3, per_dim=3), expect(3, 3, [0, 4, 7], [0, 2, 5]))
    assert torch.equal(spectrum.farms_windows(mats, window=3, per_dim=2, ratio=2.0), expect(3, 6, [0, 7], [0, 2]))
    assert torch.equal(spectrum.farms_windows(mats, window=9, ratio=0.5), expect(9, 4, [0, 1], [0, 1, 3, 4]))
    assert torch.equal(spectrum.farms_windows(mats, window=12, ratio=1.0), expect(10, 8, [0], [0]))  # clipped
    assert torch.equal(spectrum.farms_windows(mats, window=2, ratio=0.1), expect(2, 1, [0, 3, 5, 8], [0, 2, 5, 7]))
    tiny = torch.arange(3 * 3, dtype=torch.float64).reshape(1, 3, 3)
    assert spectrum.farms_windows(tiny).shape == (4, 2, 2)  # half of 3 is 1: at least 2 rows


# --- layers.py --------------------------------------------------------------------------------------------------


def _ref(name: str, t: torch.Tensor, rows: list | None = None, **kw) -> TensorRef:
    """A TensorRef of ``t``; with ``rows``, reads rows through load_rows and records each (start, stop)."""
    load_rows = None if rows is None else (lambda a, b: rows.append((a, b)) or t[a:b])
    return TensorRef(name, tuple(t.shape), t.dtype, load=lambda: t, load_rows=load_rows, **kw)


def _plan(*refs: TensorRef, **options) -> list:
    return plan_layers(Checkpoint("mem", "test", tuple(refs)), **options)[0]


def test_a_stacked_moe_tensor_is_one_linear_layer_per_expert():
    w = torch.randn(3, 8, 6)
    rows: list = []
    specs = _plan(_ref("model.layers.0.mlp.experts.down_proj", w, rows))
    assert [s.name for s in specs] == [f"model.layers.0.mlp.experts.down_proj.{e}" for e in range(3)]
    for e, s in enumerate(specs):
        assert (s.kind, s.shape, s.tensor) == ("linear", (8, 6), "model.layers.0.mlp.experts.down_proj")
        assert (s.ref.name, s.ref.shape, s.ref.dtype) == (s.name, (8, 6), torch.float32)
        assert torch.equal(s.ref.load(), w[e])
    assert rows == [(0, 1), (1, 2), (2, 3)]  # one expert read at a time


def test_fused_qkv_is_split_into_three_equal_parts_on_request():
    g = torch.Generator().manual_seed(0)
    rows_w = torch.randn(24, 8, generator=g)  # torch layout (3·d, in): parts are row blocks
    rows: list = []
    specs = _plan(_ref("h.0.attn.qkv.weight", rows_w, rows), split_qkv=True)
    assert [(s.name, s.kind, s.shape, s.tensor) for s in specs] == [
        (f"h.0.attn.qkv.{p}", "linear", (8, 8), "h.0.attn.qkv.weight") for p in "qkv"]
    for i, s in enumerate(specs):
        assert (s.ref.name, s.ref.shape, s.ref.dtype) == (f"h.0.attn.qkv.weight.{'qkv'[i]}", (8, 8), torch.float32)
        assert torch.equal(s.ref.load(), rows_w[8 * i:8 * (i + 1)])
    assert rows == [(0, 8), (8, 16), (16, 24)]
    assert all(type(d) is int for s in specs for d in s.shape + s.ref.shape)
    conv1d = torch.randn(8, 24, generator=g)  # GPT-2's Conv1D (in, 3·d): parts are column blocks
    for ref in (_ref("h.0.attn.c_attn.weight", conv1d, transposed=True), _ref("h.0.attn.c_attn.weight", conv1d)):
        specs = _plan(ref, split_qkv=True)
        assert [(s.name, s.shape) for s in specs] == [(f"h.0.attn.c_attn.{p}", (8, 8)) for p in "qkv"]
        for i, s in enumerate(specs):
            assert torch.equal(s.ref.load(), conv1d[:, 8 * i:8 * (i + 1)])
    assert all(type(d) is int for s in specs for d in s.shape + s.ref.shape)
    wide = torch.randn(24, 48, generator=g)  # a Conv1D 24 → 3·16: columns, though 24 rows split in three too
    specs = _plan(_ref("h.1.attn.c_attn.weight", wide, transposed=True), split_qkv=True)
    assert [s.shape for s in specs] == [(24, 16)] * 3 and torch.equal(specs[2].ref.load(), wide[:, 32:])
    assert [s.name for s in _plan(_ref("qkv.weight", rows_w), split_qkv=True)] == ["qkv.q", "qkv.k", "qkv.v"]
    assert [s.name for s in _plan(_ref("h.0.attn.qkv.weight", rows_w))] == ["h.0.attn.qkv"]  # not by default
    # only the layer's own name counts: a projection inside a module called qkv is not fused
    assert [s.name for s in _plan(_ref("blocks.0.qkv.proj.weight", rows_w), split_qkv=True)] == ["blocks.0.qkv.proj"]
    assert [s.name for s in _plan(_ref("h.0.mlp.fc.weight", rows_w), split_qkv=True)] == ["h.0.mlp.fc"]
    assert [s.name for s in _plan(_ref("h.0.qkv.weight", torch.randn(7, 5)), split_qkv=True)] == ["h.0.qkv"]
    assert [s.name for s in _plan(_ref("h.0.qkv.weight", torch.randn(24, 8, 3)), split_qkv=True)] == ["h.0.qkv"]


def test_planning_skips_what_is_no_layer_and_goes_on():
    refs = (_ref("emb.weight", torch.randn(20, 8)), _ref("cls_token", torch.randn(1, 1, 8)),
            _ref("bil.weight", torch.randn(4, 8, 8), kind_hint="linear"),  # a Bilinear: no matrix view
            _ref("tok_emb.weight", torch.randn(30, 8)), _ref("ln.weight", torch.randn(8)),
            _ref("fc.weight", torch.randn(6, 8)))
    specs, skipped = plan_layers(Checkpoint("mem", "test", refs))
    assert [s.name for s in specs] == ["fc"] and skipped == {"embedding": 2, "excluded": 0}


def test_fused_axis_finds_the_stacked_dimension():
    cases = {((24, 8), False): 0, ((8, 24), False): 1, ((6, 18), False): 1, ((9, 9), False): 0,
             ((4, 9), False): 1, ((7, 5), False): None, ((8, 24), True): 1, ((24, 8), True): None,
             ((9, 3), True): 1, ((9, 4), True): None, ((3, 9), True): 1}
    for (shape, transposed), axis in cases.items():
        assert fused_axis(shape, transposed) == axis, (shape, transposed)


def test_fp8_block_scales_multiply_their_blocks():
    """``weight_scale_inv`` of a 2-D FP8 weight is a grid of square blocks: 5×7 with a 3×4 grid has 2×2 blocks."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(5, 7, generator=g) * 4).to(torch.float8_e4m3fn)
    s = torch.rand(3, 4, generator=g) + 0.5
    rows: list = []
    (spec,) = _plan(_ref("l.weight", q, rows), _ref("l.weight_scale_inv", s))
    want = q.float() * s.repeat_interleave(2, 0)[:5].repeat_interleave(2, 1)[:, :7]
    assert spec.ref.dtype == torch.float32 and spec.ref.shape == (5, 7)
    assert torch.equal(spec.ref.load(), want)
    assert torch.equal(spec.ref.load_slice(1, 3), want[1:3]) and rows == []  # never the raw FP8 rows
    (spec,) = _plan(_ref("l.weight", q, rows), _ref("l.weight_scale", torch.tensor([2.0])))
    assert torch.equal(spec.ref.load_slice(1, 3), q.float()[1:3] * 2) and rows == []
    for bad in (torch.rand(3, 5), torch.rand(12)):
        with pytest.raises(TbdiagError) as info:
            _plan(_ref("l.weight", q), _ref("l.weight_scale_inv", bad))
        assert str(info.value) == (f"mem: l.weight_scale_inv has shape {list(bad.shape)}, not a block grid of a 5×7 "
                                   "weight; this FP8 layout is unknown: dequantise the checkpoint first, or exclude "
                                   "the layer")
    stack = torch.randn(2, 4, 4).to(torch.float8_e4m3fn)  # a 3-D weight has no block grid
    with pytest.raises(TbdiagError, match="not a block grid of a 2×4×4 weight"):
        _plan(_ref("experts.w.weight", stack), _ref("experts.w.weight_scale_inv", torch.rand(2, 2)))


def test_transformers_conv1d_is_a_transposed_linear():
    class Conv1D(nn.Module):  # transformers' GPT-2 Conv1D, recognised by name and nf without importing it
        def __init__(self, nf: int, nx: int, weight_shape: tuple | None = None) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.zeros(weight_shape or (nx, nf)))

    class NotConv1D(nn.Linear):
        def __init__(self) -> None:
            super().__init__(8, 24)
            self.nf = 8

    assert is_transposed_linear(Conv1D(24, 8)) and kind_of_module(Conv1D(24, 8)) == "linear"
    assert not is_transposed_linear(Conv1D(8, 24, (8, 24)))  # stored out × in: not transposed
    assert not is_transposed_linear(Conv1D(24, 8, (8, 24, 1)))  # not a matrix
    assert not is_transposed_linear(NotConv1D()) and not is_transposed_linear(nn.Linear(8, 24))
    assert kind_of_module(nn.Conv3d(2, 4, 3)) == "conv3d" and kind_of_module(nn.LayerNorm(4)) is None
    (spec,) = _plan(*[_ref("c.weight", torch.randn(8, 24), kind_hint="linear", transposed=True)])
    assert spec.kind == "linear"


# --- allocation/allocators.py -----------------------------------------------------------------------------------


def test_sparsity_follows_alphapruning_with_an_exact_mean():
    """r = (α − α_min)/(α_max − α_min)·2ε + 1 − ε, s = S·r·Σn/Σ(n·r): parameter-weighted mean exactly S."""
    sizes = [100, 200, 300]
    r = [0.7, 1.0, 1.3]
    got = sparsity([2.0, 3.0, 4.0], sizes, 0.5)  # ε = 0.3
    assert got == pytest.approx([0.5 * x * 600 / 660 for x in r], rel=1e-12)
    held = sparsity([2.0, 3.0, 4.0], sizes, 0.9, max_sparsity=0.95)  # the third would pass 0.95: held there
    c = (0.9 * 600 - 300 * 0.95) / (100 * 0.7 + 200 * 1.0)
    assert held == pytest.approx([0.7 * c, 1.0 * c, 0.95], rel=1e-12)
    assert sum(s * n for s, n in zip(held, sizes)) / 600 == pytest.approx(0.9, abs=1e-12)
    assert sparsity([2.0, 3.0, 4.0], sizes, 0.9, max_sparsity=0.9) == pytest.approx([0.9] * 3)  # all held
    assert sparsity([2.0, math.nan, 4.0], sizes, 0.5, epsilon=0.2) == pytest.approx(
        [0.5 * x * 600 / (80 + 200 + 360) for x in (0.8, 1.0, 1.2)])  # a unit without alpha: r = 1
    for alphas in ([3.0, 3.0, 3.0], [math.nan] * 3):
        assert sparsity(alphas, sizes, 0.4) == pytest.approx([0.4] * 3)  # no spread: uniform
    assert sparsity([3.0], [1], 0.5) == pytest.approx([0.5])
    assert sparsity([2.0, 3.0], [0, 0], 0.5) == [0.0, 0.0]  # nothing to prune
    assert sparsity([2.0, 4.0], [10, 10], 0.0) == [0.0, 0.0]
    assert sparsity([2.0, 4.0], [10, 10], 0.5, epsilon=0.0) == pytest.approx([0.5, 0.5])


def test_sparsity_refuses_what_is_out_of_range():
    for kwargs, message in (
            (dict(target=1.0), "sparsity 1.0: must be at least 0 and below 1; e.g. 0.7"),
            (dict(target=1.5), "sparsity 1.5: must be at least 0 and below 1; e.g. 0.7"),
            (dict(target=-0.1), "sparsity -0.1: must be at least 0 and below 1; e.g. 0.7"),
            (dict(target=0.5, epsilon=1.0), "epsilon 1.0: must be at least 0 and below 1; e.g. 0.3 (0: uniform)"),
            (dict(target=0.5, epsilon=-0.1), "epsilon -0.1: must be at least 0 and below 1; e.g. 0.3 (0: uniform)"),
            (dict(target=0.5, max_sparsity=1.0), "max sparsity 1.0: must lie between the target 0.5 and 1; e.g. 0.99"),
            (dict(target=0.5, max_sparsity=1.5), "max sparsity 1.5: must lie between the target 0.5 and 1; e.g. 0.99"),
            (dict(target=0.5, max_sparsity=0.4), "max sparsity 0.4: must lie between the target 0.5 and 1; e.g. 0.99")):
        with pytest.raises(TbdiagError) as info:
            sparsity([2.0, 3.0], [10, 10], **kwargs)
        assert str(info.value) == message
        flag = {"sparsity": "--sparsity", "epsilon": "--epsilon", "max sparsity": "--max-sparsity"}
        name = message.split(" ")[0] if not message.startswith("max") else "max sparsity"
        assert info.value.cli_message() == message.replace(name + " ", flag[name] + " ", 1)


def test_lora_ranks_are_proportional_and_rounded_by_largest_remainders():
    assert lora_ranks([1.0, 2.0, 3.0, 6.0], 24) == [2, 4, 6, 12]
    # real ranks 5.77, 2.31, 1.92: floors 5, 2, 1 and the two largest remainders (third, first) get one more
    assert lora_ranks([3.0, 1.2, 1.0], 10) == [6, 2, 2]
    assert lora_ranks([1.0, 1.0, 1.0], 10) == [4, 3, 3]  # ties: the first unit first
    assert lora_ranks([1.0, 10.0], 5) == [1, 4]  # r_min defaults to 1 ...
    assert lora_ranks([1.0, 10.0], 5, r_min=2) == [2, 3]
    assert lora_ranks([1.0, 1.0, 10.0, 10.0], 16, r_min=3) == [3, 3, 5, 5]  # held at r_min, the rest rescaled
    assert lora_ranks([4.0, 4.0, 7.0, 13.0], 16, r_min=3) == [3, 3, 4, 6]  # 2.29 → 3, then 3.5 and 6.5
    assert lora_ranks([1.0, 10.0, 10.0], 12, r_max=5) == [2, 5, 5]  # ... and r_max to the budget
    assert lora_ranks([1.0, 4.0], 10, beta=0.5) == [3, 7]  # ∝ α^β: 1 and 2
    assert lora_ranks([2.0], 8) == [8] and lora_ranks([1.0, 2.0], 8, r_min=4, r_max=4) == [4, 4]
    assert lora_ranks([1.0, 5.0], 2) == [1, 1] and lora_ranks([1.0, 5.0], 16, r_max=8) == [8, 8]
    # a unit without a positive finite alpha takes the mean of the others
    assert lora_ranks([2.0, math.nan, 4.0], 18) == [4, 6, 8]
    assert lora_ranks([0.0, 2.0, 4.0], 18) == [6, 4, 8]
    assert lora_ranks([-1.0, 0.5, 4.0], 27, r_max=100) == lora_ranks([2.25, 0.5, 4.0], 27, r_max=100) == [9, 2, 16]
    assert lora_ranks([0.5, math.nan, 4.0], 27) == [2, 9, 16]  # mean of 0.5 and 4
    assert lora_ranks([math.nan, math.nan], 6) == [3, 3]


def test_lora_ranks_refuse_impossible_budgets():
    within = "need 1 ≤ r_min ≤ r_max and at least one layer; lower r_min or raise r_max"
    for args, kwargs, message in (
            (([], 0), {}, f"ranks 1–0 for 0 layers: {within}"),
            (([1.0, 2.0], 8), dict(r_min=0), f"ranks 0–8 for 2 layers: {within}"),
            (([1.0, 2.0], 8), dict(r_min=5, r_max=4), f"ranks 5–4 for 2 layers: {within}"),
            (([1.0, 2.0], 3), dict(r_min=2), "rank budget 3: 2 layers need between 4 (r_min 2) and 6 (r_max 3); "
                                             "change the budget or the bounds"),
            (([1.0, 2.0], 9), dict(r_max=4), "rank budget 9: 2 layers need between 2 (r_min 1) and 8 (r_max 4); "
                                             "change the budget or the bounds"),
            (([1.0, 2.0], 8), dict(beta=math.nan), "beta nan: must be a finite exponent between -8 and 8; e.g. 1 "
                                                   "(ranks ∝ alpha) or 0 (uniform)"),
            (([1.0, 2.0], 8), dict(beta=8.5), "beta 8.5: must be a finite exponent between -8 and 8; e.g. 1 "
                                              "(ranks ∝ alpha) or 0 (uniform)"),
            (([1.0, 2.0], 8), dict(beta=-8.5), "beta -8.5: must be a finite exponent between -8 and 8; e.g. 1 "
                                               "(ranks ∝ alpha) or 0 (uniform)")):
        with pytest.raises(TbdiagError) as info:
            lora_ranks(*args, **kwargs)
        assert str(info.value) == message
        cli = message.replace("rank budget", "--budget").replace("r_min", "--r-min").replace("r_max", "--r-max")
        assert info.value.cli_message() == cli.replace("beta ", "--beta ", 1)
    assert lora_ranks([1.0, 4.0], 10, beta=-8) == [9, 1] and lora_ranks([1.0, 4.0], 10, beta=8) == [1, 9]


def test_peft_patterns_refuse_a_lora_alpha_that_is_not_a_positive_number():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(TbdiagError) as info:
            peft_patterns({"a": 4}, ["a"], lora_alpha=bad)
        assert str(info.value) == f"lora_alpha {bad}: must be a finite number > 0; e.g. 16"
        assert info.value.cli_message() == f"--lora-alpha {bad}: must be a finite number > 0; e.g. 16"
    assert peft_patterns({"a": 4}, ["a"], lora_alpha=1e-3, default_r=4)["alpha_pattern"] == {"^a$": 1e-3}


def test_peft_patterns_pin_each_module_and_keep_alpha_over_r():
    names = ["model", "model.a", "model.a.q", "model.a.v", "model.b.q"]
    doc = peft_patterns({"model.a.q": 4, "model.a.v": 16}, names, lora_alpha=32)
    assert doc == {"r": 8, "target_modules": r"^(model\.a\.q|model\.a\.v)$",
                   "rank_pattern": {r"^model\.a\.q$": 4, r"^model\.a\.v$": 16}, "lora_alpha": 32,
                   "alpha_pattern": {r"^model\.a\.q$": 16.0, r"^model\.a\.v$": 64.0}}
    assert peft_patterns({"model.b.q": 2}, names, default_r=4) == {
        "r": 4, "target_modules": r"^(model\.b\.q)$", "rank_pattern": {r"^model\.b\.q$": 2}}
    with pytest.raises(TbdiagError) as info:
        peft_patterns({"a.x": 4}, names)
    assert str(info.value) == (r"LoRA key ^a\.x$: matches 0 modules of the model, not one; the ranks were computed "
                               "for another model or naming (pass the model the adapter will wrap)")


# --- mp.py ------------------------------------------------------------------------------------------------------


def test_mp_fit_and_js_distance_raise_no_numpy_warnings():
    """The MP density is evaluated at x = 0 (divide) and outside the bulk (sqrt of a negative); js_distance takes
    log 0 for empty bins: both are masked, and must not reach the user as RuntimeWarnings."""
    import warnings

    from tbdiag.esd.mp import _mp_density, js_distance

    g = np.random.default_rng(0)
    w = g.standard_normal((120, 100))
    ev = np.linalg.eigvalsh(w.T @ w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = mp_fit(ev, 120, 100)
        density = _mp_density(np.array([0.0, 0.5, 10.0]), 1.2, np.array([1.0]))
        distance = js_distance(np.array([0.0, 1.0, 3.0]), np.array([2.0, 0.0, 2.0]))
    assert math.isfinite(fit.sigma) and density[0, 0] == 0.0 and density[0, 2] == 0.0 and density[0, 1] > 0
    # p = (0, ¼, ¾), q = (½, 0, ½), m = (p + q)/2 = (¼, ⅛, ⅝)
    kl_p, kl_q = 0.25 * math.log(0.25 / 0.125) + 0.75 * math.log(0.75 / 0.625), 0.5 * math.log(2) + 0.5 * math.log(0.8)
    assert distance == pytest.approx(math.sqrt((kl_p + kl_q) / 2), rel=1e-12)


def test_js_distance_of_float32_inputs_is_computed_in_float64():
    from tbdiag.esd.mp import js_distance

    g = np.random.default_rng(1)
    p, q = g.random(1000).astype(np.float32), g.random(1000).astype(np.float32)
    want = js_distance(p.astype(np.float64), q.astype(np.float64))
    assert js_distance(p, q) == want and js_distance(p, q.astype(np.float64)) == want
    assert js_distance(p.astype(np.float64), q) == want


def test_quarter_circle_residual_from_three_sums_equals_the_direct_sums():
    from tbdiag.esd.mp import _Residual

    g = np.random.default_rng(2)
    sv = np.linalg.svd(g.standard_normal((200, 200)) / math.sqrt(200), compute_uv=False)
    residual = _Residual(sv, 1.0)
    sigma = np.array([0.6, 1.0, 1.3])
    c = 1 / (np.pi * sigma[:, None] ** 2)
    direct = ((c * np.sqrt(np.clip(4 - residual.x ** 2, 0, None)) - residual.y) ** 2).sum(axis=1)
    np.testing.assert_allclose(residual(sigma), direct, rtol=1e-9, atol=0)


def test_a_spike_that_hides_the_bulk_from_the_kde_grid_gives_no_mp_fit():
    """4,000 eigenvalues near 0.5 and one of 10⁴: the KDE's 1000 points are 2.5 apart (in mean-1 units), wider
    than its bandwidth, and keep no point; the fit is nan rather than the grid's first σ."""
    from tbdiag.esd.mp import NO_FIT, _Residual, fit_sigma

    g = np.random.default_rng(0)
    ev = np.concatenate([g.uniform(0.3, 0.7, 3999), [1e4]])
    assert len(_Residual(ev / ev.mean(), 2.0).x) == 0
    assert math.isnan(fit_sigma(ev / ev.mean(), 2.0))
    assert mp_fit(ev, 8000, 4000) == NO_FIT and mp_fit(ev, 8000, 4000).num_spikes is None
    kept = np.concatenate([g.uniform(0.3, 0.7, 1999), [1e4]])  # 2,000: the grid keeps the spike's point
    assert len(_Residual(kept / kept.mean(), 2.0).x) == 1 and math.isfinite(mp_fit(kept, 4000, 2000).sigma)


def test_mp_fit_of_float32_eigenvalues_is_computed_in_float64():
    g = np.random.default_rng(3)
    w = g.standard_normal((150, 100))
    ev = np.linalg.eigvalsh(w.T @ w).astype(np.float32)
    assert mp_fit(ev, 150, 100) == mp_fit(ev.astype(np.float64), 150, 100)


def test_a_sigma_whose_edges_miss_the_peak_costs_the_penalty_at_every_point():
    from tbdiag.esd.mp import PENALTY, _Residual, fit_sigma

    g = np.random.default_rng(4)
    w = g.standard_normal((200, 100))
    ev = np.linalg.eigvalsh(w.T @ w)
    residual = _Residual(ev / ev.mean(), 2.0)
    tiny, fine = 0.01, fit_sigma(ev / ev.mean(), 2.0)  # λ₊ of σ = 0.01 lies left of the peak
    got = residual(np.array([tiny, fine]))
    assert got[0] == PENALTY ** 2 * len(residual.x) == 1e6 * len(residual.x)
    assert got[1] < 1e6


def test_nelder_mead_expands_doubling_steps_until_its_call_budget():
    """From x0 = 1 towards a far minimum: simplex (1, 1.05), the better point first; each iteration reflects and
    expands (2 calls), the best point moving by 2d while the step d doubles: 1.05 → 1.15 → 1.35 → 1.75 → 2.55."""
    from tbdiag.esd.mp import nelder_mead_1d

    calls: list[float] = []

    def far(x):
        calls.append(float(x[0]))
        return (x - 1e3) ** 2

    for budget, best in ((9, 2.55), (10, 2.55), (11, 4.15)):
        calls.clear()
        assert nelder_mead_1d(far, 1.0, max_calls=budget) == pytest.approx(best, rel=1e-12)
        assert len(calls) == budget + (budget % 2)  # 2 calls per iteration: stops at the first even count ≥ budget
    assert calls[:4] == pytest.approx([1.0, 1.05, 1.1, 1.15], rel=1e-12)
    counted: list[float] = []
    nelder_mead_1d(lambda x: counted.append(float(x[0])) or -x, 1.0)  # unbounded below: expands until the budget
    assert len(counted) == 200  # the default budget
    calls.clear()
    assert nelder_mead_1d(far, 0.0, max_calls=9) == pytest.approx(0.00775, rel=1e-9)  # x0 = 0: second point 0.00025
    assert calls[:2] == [0.0, 0.00025]


def test_nelder_mead_keeps_the_start_first_on_a_tie_and_converges_from_zero():
    from tbdiag.esd.mp import nelder_mead_1d

    cubic = lambda x: (x - 1) * (x - 1.05) * (x - 3)  # noqa: E731 - f(1) = f(1.05) = 0
    assert nelder_mead_1d(cubic, 1.0, max_calls=4) == pytest.approx(0.9, rel=1e-12)  # best 1: reflect 0.95, expand 0.9
    assert nelder_mead_1d(lambda x: (x - 1) ** 2, 0.0) == pytest.approx(1.0, abs=1e-4)


def _nm_trace(f, x0: float, max_calls: int) -> tuple[float, list[float]]:
    from tbdiag.esd.mp import nelder_mead_1d

    points: list[float] = []

    def fx(x):
        points.append(float(x[0]))
        return np.array([f(float(x[0]))])

    return nelder_mead_1d(fx, x0, max_calls=max_calls), points


def test_nelder_mead_trace_through_expansion_reflection_and_inside_contraction():
    """f = (x − 2)² from 1, by hand: three expansions (1.15, 1.35, 1.75), an expansion refused for its
    reflection (2.15 kept, 2.55 worse), two inside contractions (1.95, then 2.05, no better in floating point:
    1.95 stays first)."""
    best, points = _nm_trace(lambda x: (x - 2.0) ** 2, 1.0, 14)
    assert points == pytest.approx([1.0, 1.05, 1.1, 1.15, 1.25, 1.35, 1.55, 1.75, 2.15, 2.55, 2.55, 1.95, 1.75, 2.05],
                                   rel=1e-12)
    assert best == pytest.approx(1.95, rel=1e-12)


def test_nelder_mead_ties_with_the_best_and_the_worst_point_contract():
    """f = |x − 1.2|: after 1.15 (expansion), the reflection 1.25 is no better than the best (0.05 up to
    rounding): an outside contraction to 1.2; then the reflection 1.25 is no better than the worst: an inside
    contraction to 1.175."""
    best, points = _nm_trace(lambda x: abs(x - 1.2), 1.0, 8)
    assert points == pytest.approx([1.0, 1.05, 1.1, 1.15, 1.25, 1.2, 1.25, 1.175], rel=1e-12)
    assert best == pytest.approx(1.2, rel=1e-12)


@pytest.mark.parametrize("values, trace", [
    ({0.95: 1.0, 0.975: 1.5, 1.025: 0.5}, [1.0, 1.05, 0.95, 0.975, 1.025]),  # outside contraction worse: shrink
    ({0.95: 1.0, 0.975: 1.0}, [1.0, 1.05, 0.95, 0.975]),  # outside contraction as good as the reflection: kept
    ({0.95: 3.0, 1.025: 2.0}, [1.0, 1.05, 0.95, 1.025, 1.025]),  # inside contraction not better: shrink
])
def test_nelder_mead_shrinks_towards_the_best_point_when_a_contraction_fails(values, trace):
    """f(1) = 0 and f(1.05) = 2 (so the best stays 1), other values by hand; shrinking halves the distance to it."""
    table = {1.0: 0.0, 1.05: 2.0, **values}
    best, points = _nm_trace(lambda x: table.get(round(x, 9), 10.0), 1.0, len(trace))
    assert points == pytest.approx(trace, rel=1e-12) and best == 1.0


def _entropy_by_hand(ev: list[float], rank: int) -> float:
    total = sum(ev)
    p = [x / total + 1e-10 for x in ev]
    return -sum(x * math.log(x) for x in p) / math.log(rank + 1e-10)


def test_matrix_entropy_of_a_rank_two_spectrum_by_hand():
    assert matrix_entropy(np.array([0.0, 0.0, 1.0, 3.0]), 4) == pytest.approx(
        _entropy_by_hand([0.0, 0.0, 1.0, 3.0], 2), rel=1e-14)


def test_matrix_entropy_rank_counts_singular_values_above_max_times_n_times_eps():
    eps = np.finfo(np.float64).eps
    # n = 1, σ_max = 1: a singular value of exactly ε (eigenvalue ε²) is at the threshold, not above it
    assert matrix_entropy(np.array([eps * eps, 1.0, 1.0]), 1) == pytest.approx(
        _entropy_by_hand([eps * eps, 1.0, 1.0], 2), rel=1e-14)
    # n = 100: σ = 1e-14 is below 100·ε ≈ 2.2e-14 (it would count against ε/100)
    assert matrix_entropy(np.array([1e-28, 1.0, 2.0, 3.0]), 100) == pytest.approx(
        _entropy_by_hand([1e-28, 1.0, 2.0, 3.0], 3), rel=1e-14)


def test_matrix_entropy_clips_negative_round_off_and_reads_float32_in_float64():
    assert matrix_entropy(np.array([-1e-12, 1.0, 2.0, 3.0]), 4) == matrix_entropy(np.array([0.0, 1.0, 2.0, 3.0]), 4)
    ev = np.random.default_rng(5).random(200).astype(np.float32)
    assert matrix_entropy(ev, 300) == matrix_entropy(ev.astype(np.float64), 300)


@pytest.mark.parametrize("values, calls, best", [
    ({0.95: 0.0, 0.975: -1.0}, [1.0, 1.05, 0.95, 0.975], 0.975),  # reflection ties the best: no expansion
    ({0.95: -1.0, 0.9: -1.0}, [1.0, 1.05, 0.95, 0.9], 0.95),  # expansion only ties the reflection: reflection kept
    ({0.95: 2.0, 1.025: 1.0}, [1.0, 1.05, 0.95, 1.025], 1.0),  # reflection ties the worst: inside contraction
    ({0.95: 3.0, 1.025: 0.0}, [1.0, 1.05, 0.95, 1.025], 1.0),  # new point ties the best: the best stays first
])
def test_nelder_mead_breaks_exact_ties_towards_the_points_it_has(values, calls, best):
    """f(1) = 0 and f(1.05) = 2 (the best is 1), other values by hand and exact, so that comparisons tie."""
    table = {1.0: 0.0, 1.05: 2.0, **values}
    got, points = _nm_trace(lambda x: table.get(round(x, 9), 10.0), 1.0, 4)
    assert points == pytest.approx(calls, rel=1e-12) and got == best


def test_nelder_mead_swaps_values_with_points():
    """f(1) = 5, f(1.05) = 1: 1.05 first, with its value; the reflection 1.1 (3) lies between: outside contraction."""
    table = {1.0: 5.0, 1.05: 1.0, 1.1: 3.0, 1.075: 2.0}
    got, points = _nm_trace(lambda x: table.get(round(x, 9), 10.0), 1.0, 4)
    assert points == pytest.approx([1.0, 1.05, 1.1, 1.075], rel=1e-12) and got == 1.05


def test_nelder_mead_stops_when_both_tolerances_are_met_exactly():
    from tbdiag.esd.mp import nelder_mead_1d

    calls: list[float] = []
    flat = lambda x: calls.append(float(x[0])) or 0 * x  # noqa: E731
    assert nelder_mead_1d(flat, 0.0, xatol=0.00025) == 0.0 and len(calls) == 2  # |Δx| = xatol exactly
    calls.clear()
    step = lambda x: calls.append(float(x[0])) or (x > 0) * 0.5  # noqa: E731 - f(0) = 0, f(0.00025) = 0.5
    assert nelder_mead_1d(step, 0.0, xatol=1.0, fatol=0.5) == 0.0 and len(calls) == 2  # |Δf| = fatol exactly
