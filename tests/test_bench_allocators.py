"""benchmarks/bench_allocators.py, pruning part at the --quick sizes on tiny synthetic data: every tuned layer
of the char LM and of the MNIST CNN ends with exactly the zeros its allocation asks for (within one element),
the zeros are the smallest-magnitude weights, nothing else is touched, and the alpha allocation really
differs from the uniform one (so a benchmark that pruned uniformly under the alpha label would fail here)."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tbdiag
from tbdiag.allocation.recommend import allocation
from tbdiag.train.data import load_dataset
from tests.scripts import imported

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_allocators.py"


@pytest.fixture(scope="module")
def bench():
    yield from imported(BENCH, "bench_allocators")


def synthetic_text(n: int = 12_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["thee", "thou", "art", "love", "time", "summer", "eyes", "heart", "shall", "not", "fair", "day"]
    out, size = [], 0
    while size < n:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + rng.choice([",\n", ".\n", ";\n"])
        out.append(line)
        size += len(line)
    return "".join(out)[:n]


@pytest.fixture(scope="module")
def trained(bench):
    """The quick LM and the CNN, each trained a few updates on synthetic data, with their evaluators."""
    torch.set_num_threads(1)
    s = bench.QUICK
    ids, chars = bench.encode(synthetic_text())
    n90 = int(0.9 * len(ids))
    lm, _ = bench.train_lm(s, ids[:n90], len(chars), seed=0, steps=8)
    data = load_dataset("synthetic", None, image_shape=(1, 28, 28), synthetic_size=128)
    cnn, _ = bench.train_cnn(replace(s, cnn_steps=6, cnn_batch=32), data, seed=0)
    return {
        "lm": (lm, lambda m: bench.lm_val_loss(m, ids[n90:], stride=4), ("uniform", "alpha", "alpha-block")),
        "cnn": (cnn, lambda m: bench.cnn_accuracy(m, data.x_test, data.y_test), ("uniform", "alpha")),
    }


def expected_sparsities(analysis, target: float, how: str) -> dict[str, float]:
    """The per-layer sparsities the allocation document asks for, read independently of the benchmark."""
    doc = allocation(analysis, "sparsity", unit="block" if how == "alpha-block" else "layer", sparsity=target,
                     epsilon=0.3)
    assert doc["schema"] == "tbdiag.allocation/v1" and doc["target"] == "sparsity"
    return {name: (target if how == "uniform" else g["sparsity"])
            for g in doc["layers"].values() for name in g["layers"]}


@pytest.mark.parametrize("which", ["lm", "cnn"])
def test_quick_pruning_realises_the_allocation(bench, trained, which):
    model, evaluate, hows = trained[which]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    analysis = tbdiag.analyze(model, fit="median")
    sweep = bench.prune_sweep(model, evaluate, bench.SPARSITIES, hows, epsilon=0.3)
    assert {k: torch.equal(v, dense_state[k]) for k, v in model.state_dict().items()} == \
        {k: True for k in dense_state}  # the sweep prunes copies; the trained model stays dense
    assert math.isfinite(sweep["dense"])
    assert [(r["target"], r["allocation"]) for r in sweep["runs"]] == [(t, h) for t in bench.SPARSITIES for h in hows]

    for run in sweep["runs"]:
        want = expected_sparsities(analysis, run["target"], run["allocation"])
        assert len(want) >= 2 and set(run["layers"]) == set(want)  # every tuned layer, nothing else
        # prune a copy the benchmark's way and count the zeros ourselves
        sparsities, _ = bench.layer_sparsities(analysis, run["target"], run["allocation"], epsilon=0.3)
        pruned = copy.deepcopy(model)
        bench.magnitude_prune_(pruned, sparsities)
        state = pruned.state_dict()
        total_zeros = total_n = 0
        for key, before in dense_state.items():
            name = key.removesuffix(".weight")
            if name not in want or not key.endswith(".weight"):
                assert torch.equal(state[key], before), f"{key} changed but is not in the allocation"
                continue
            w = state[key]
            zeros = int((w == 0).sum())
            assert abs(zeros - want[name] * w.numel()) <= 1, (run["allocation"], run["target"], name, zeros,
                                                               want[name] * w.numel())
            assert run["layers"][name]["zeros"] == zeros  # what the benchmark reports is what is there
            assert run["layers"][name]["sparsity"] == pytest.approx(want[name])
            kept, cut = before[w != 0].abs(), before[w == 0].abs()
            assert kept.min() >= cut.max()  # magnitude pruning: the zeros are the smallest weights
            total_zeros, total_n = total_zeros + zeros, total_n + w.numel()
        assert total_zeros / total_n == pytest.approx(run["target"], abs=len(want) / total_n)
        assert run["realised"] == pytest.approx(total_zeros / total_n)
        assert math.isfinite(run["score"])
        if run["allocation"] != "uniform":  # the alpha allocation is not the uniform one in disguise
            n = {name: model.get_submodule(name).weight.numel() for name in want}
            assert max(abs(want[k] - run["target"]) * n[k] for k in want) > 2


def test_uniform_pruning_would_not_pass_for_alpha(bench, trained):
    """The check above can fail: uniform zeros measured against the alpha allocation are off by far more
    than one element in some layer."""
    model, _, _ = trained["lm"]
    analysis = tbdiag.analyze(model, fit="median")
    want = expected_sparsities(analysis, 0.7, "alpha")
    pruned = copy.deepcopy(model)
    realised = bench.magnitude_prune_(pruned, {name: 0.7 for name in want})
    off = [abs(r["zeros"] - want[name] * r["n"]) for name, r in realised.items()]
    assert max(off) > 1
