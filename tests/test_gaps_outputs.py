"""Tests written against surviving mutants of benchmarks/mutation.sh (outputs modules): each checks a value a planted bug changes."""

from __future__ import annotations

import math
import re
from functools import lru_cache

import pytest

import tbdiag
from tbdiag.allocation import allocators
from tbdiag.allocation.maps import unit_multipliers
from tbdiag.allocation.recommend import allocation, recommend
from tbdiag.errors import TbdiagError
from tests.test_prune import llama_state

# --- allocation/recommend.py --------------------------------------------------------------------------------------

TUNED = [f"model.layers.{b}.{m}" for b in range(3)
         for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@lru_cache(maxsize=1)
def llama() -> tbdiag.Analysis:
    """Three LLaMA blocks: 15 layers tuned (k/v have 32 eigenvalues, the embedding and lm_head are left out)."""
    return tbdiag.analyze(llama_state())


def alphas_of(names):
    rows = {r.name: r for r in llama().layers}
    return [rows[n].alpha for n in names]


def sizes_of(names):
    rows = {r.name: r for r in llama().layers}
    return [math.prod(rows[n].shape) for n in names]


def test_a_weight_decay_allocation_records_every_unit_by_hand():
    doc = allocation(llama(), "weight_decay", weight_decay=0.05, map="sqrt", min_ratio=0.5, max_ratio=1.5)
    mult = unit_multipliers(TUNED, alphas_of(TUNED), "sqrt", 0.5, 1.5)
    assert {k: v for k, v in doc.items() if k != "layers"} == {
        "schema": "tbdiag.allocation/v1", "source": "<state dict>", "target": "weight_decay", "unit": "layer",
        "fit": "ks", "parameters": {"weight_decay": 0.05, "map": "sqrt", "min_ratio": 0.5, "max_ratio": 1.5}}
    assert doc["layers"] == {n: {"alpha": a, "layers": [n], "n_params": s, "multiplier": mult[n],
                                 "weight_decay": 0.05 * mult[n]}
                             for n, a, s in zip(TUNED, alphas_of(TUNED), sizes_of(TUNED))}


def test_weight_decay_defaults_are_linear_between_half_and_one_and_a_half():
    plain = allocation(llama(), "weight_decay")["layers"]
    assert all("weight_decay" not in g for g in plain.values())
    assert {u: g["multiplier"] for u, g in plain.items()} == unit_multipliers(TUNED, alphas_of(TUNED), "linear", 0.5, 1.5)
    wide = allocation(llama(), "weight_decay", min_ratio=0.2, max_ratio=3.0, weight_decay=0.0)["layers"]
    assert min(g["multiplier"] for g in wide.values()) == pytest.approx(0.2)
    assert max(g["multiplier"] for g in wide.values()) == pytest.approx(3.0)
    assert {g["weight_decay"] for g in wide.values()} == {0.0}


def test_a_block_unit_groups_its_layers_sizes_and_mean_alpha():
    doc = allocation(llama(), "weight_decay", unit="block")
    assert list(doc["layers"]) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    block = doc["layers"]["model.layers.1"]
    names = TUNED[5:10]
    assert block["layers"] == names and block["n_params"] == sum(sizes_of(names))
    assert block["alpha"] == pytest.approx(sum(alphas_of(names)) / 5, rel=1e-15)


def test_a_sparsity_allocation_is_alphapruning_with_its_parameters():
    doc = allocation(llama(), "sparsity", sparsity=0.5)
    want = allocators.sparsity(alphas_of(TUNED), sizes_of(TUNED), 0.5, 0.3, 0.99)
    assert [g["sparsity"] for g in doc["layers"].values()] == want
    tight = allocation(llama(), "sparsity", sparsity=0.5, epsilon=0.9, max_sparsity=0.6)
    assert [g["sparsity"] for g in tight["layers"].values()] == allocators.sparsity(
        alphas_of(TUNED), sizes_of(TUNED), 0.5, 0.9, 0.6)
    assert max(g["sparsity"] for g in tight["layers"].values()) == pytest.approx(0.6)


def test_lora_ranks_and_their_peft_arguments():
    doc = allocation(llama(), "lora_rank", budget=45, beta=2.0, r_min=2, r_max=5.0, lora_alpha=16.0)
    ranks = allocators.lora_ranks(alphas_of(TUNED), 45, 2.0, 2, 5)
    assert [g["rank"] for g in doc["layers"].values()] == ranks and sum(ranks) == 45 and max(ranks) == 5
    assert doc["peft"] == {
        "r": 3, "target_modules": "^(" + "|".join(re.escape(n) for n in sorted(TUNED)) + ")$",
        "rank_pattern": {f"^{re.escape(n)}$": r for n, r in zip(TUNED, ranks)},
        "lora_alpha": 16.0, "alpha_pattern": {f"^{re.escape(n)}$": 16.0 * r / 3 for n, r in zip(TUNED, ranks)}}
    plain = allocation(llama(), "lora_rank", budget=40)
    assert [g["rank"] for g in plain["layers"].values()] == allocators.lora_ranks(alphas_of(TUNED), 40, 1.0, 1, None)
    assert "lora_alpha" not in plain["peft"] and plain["peft"]["r"] == round(40 / 15)


@pytest.mark.parametrize("call, message", [
    (lambda: allocation(llama(), "lr"), "target 'lr': use one of weight_decay, sparsity, lora_rank (lr: recommend)"),
    (lambda: allocation(llama(), "lora_rank", unit="block", budget=40), "LoRA ranks are per module: use unit layer"),
    (lambda: allocation(llama(), "weight_decay", weight_decay=-0.1),
     "weight_decay -0.1: must be a finite number ≥ 0; e.g. 0.05"),
    (lambda: allocation(llama(), "weight_decay", weight_decay=math.inf),
     "weight_decay inf: must be a finite number ≥ 0; e.g. 0.05"),
    (lambda: allocation(llama(), "sparsity", sparsity=0.5, include=("zzz",), exclude=("q_proj",)),
     "<state dict>: no layer to allocate to with include 'zzz', exclude 'q_proj' among its 22 layers "
     "(model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj …); "
     "check the patterns"),
    (lambda: allocation(llama(), "sparsity", sparsity=0.5, min_evals=1000),
     "<state dict>: no layer to allocate to (Conv/Linear with ≥ 1000 eigenvalues, input and output layers "
     "excluded); include the first and last layers or lower the eigenvalue minimum"),
    (lambda: recommend(llama(), min_evals=1000, include_first_last=True),
     "<state dict>: no layer to tune (Conv/Linear with ≥ 1000 eigenvalues); lower the eigenvalue minimum"),
    (lambda: recommend(llama(), metric="beta"), "metric 'beta': use one of alpha, alpha_weighted, spectral_norm"),
])
def test_allocation_and_recommend_refusals_say_what_and_how(call, message):
    with pytest.raises(TbdiagError) as err:
        call()
    assert str(err.value) == message


def test_refusals_name_the_cli_flags_of_their_parameters():
    with pytest.raises(TbdiagError) as err:
        allocation(llama(), "weight_decay", weight_decay=-1.0)
    assert err.value.cli_message() == "--weight-decay -1.0: must be a finite number ≥ 0; e.g. 0.05"
    with pytest.raises(TbdiagError) as err:
        recommend(llama(), include=("zzz",), exclude=("q_proj",))
    assert "no layer to tune with --include 'zzz', --exclude 'q_proj' among" in err.value.cli_message()
    with pytest.raises(TbdiagError) as err:
        recommend(llama(), min_evals=1000)
    assert err.value.cli_message().endswith("; --include-first-last or lower --min-evals")
