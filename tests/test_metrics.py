import math

import pytest
import torch

from tbdiag import AnalyzeOptions, analyze
from tbdiag.esd.metrics import layer_result


def evals_of(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double()).square().sort().values


def test_metric_formulas():
    torch.manual_seed(0)
    ev = evals_of(torch.randn(80, 40))
    r = layer_result("x", "linear", (80, 40), ev)
    assert r.status == "ok"
    lmax, s = float(ev[-1]), float(ev.sum())
    assert r.lambda_max == pytest.approx(lmax) and r.fnorm2 == pytest.approx(s)
    assert r.alpha_weighted == pytest.approx(r.alpha * math.log10(lmax))
    assert r.log_norm == pytest.approx(math.log10(s))
    assert r.log_spectral_norm == pytest.approx(math.log10(lmax))
    assert r.log_alpha_norm == pytest.approx(math.log10(float((ev ** r.alpha).sum())))
    assert r.stable_rank == pytest.approx(s / lmax)


def test_failed_layers_get_nan_and_a_status():
    state = {
        "ok.weight": torch.randn(64, 32),
        "nonfinite.weight": torch.randn(64, 32).index_put_((torch.tensor([3]), torch.tensor([4])), torch.tensor(float("nan"))),
        "zero.weight": torch.zeros(64, 32),
        "rank1.weight": torch.outer(torch.randn(64), torch.randn(32)),
        "orthogonal.weight": torch.eye(32),
        "small.weight": torch.randn(4, 3),
    }
    rows = {r.name: r for r in analyze(state).layers}
    assert rows["ok"].status == "ok"
    expected = {"nonfinite": "non_finite", "zero": "zero_matrix", "rank1": "degenerate",
                "orthogonal": "degenerate", "small": "too_few_evals"}
    for name, status in expected.items():
        assert rows[name].status == status, name
        assert math.isnan(rows[name].alpha) and math.isnan(rows[name].D), name
    assert rows["small"].lambda_max > 0  # measured though not fitted
    assert math.isnan(rows["nonfinite"].lambda_max)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_non_finite_weights_and_overflow_are_caught(bad, precision):
    w = torch.randn(300, 280)  # wide enough for two Gram panels
    w[123, 270] = bad  # in the second panel; 1e30 overflows the Gram in float32 (1e60), not in float64
    row = analyze({"w.weight": w}, AnalyzeOptions(precision=precision)).layers[0]
    overflow = bad == 1e30 and precision == "float64"
    assert (row.status == "non_finite") != overflow  # in float64 it is measured (one eigenvalue dwarfs the rest)
    assert math.isfinite(row.lambda_max) == overflow
