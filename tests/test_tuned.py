"""The one rule: recommend on a saved checkpoint and TempBalance on the live model agree on every unit."""

import math

import pytest
import torch

from tbdiag import TempBalance, analyze
from tbdiag.tempbalance import block_of
from tbdiag.allocation.recommend import recommend
from tbdiag.train.models import MODELS
from tests import tiny_models


def cnn():
    torch.manual_seed(0)
    return MODELS["cnn"](in_channels=1, num_classes=10, width=2.0)


def resnet():
    torch.manual_seed(0)
    return MODELS["resnet18"](num_classes=10, width=0.25)


def save(model, folder):
    """As users save: HF models with save_pretrained (safetensors, no order metadata), others with torch.save."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
        return folder
    path = folder / "model.pt"
    folder.mkdir()
    torch.save(model.state_dict(), path)
    return path


BUILDERS = {"cnn": cnn, "resnet": resnet, "mha": tiny_models.mha_net, "gpt2": tiny_models.gpt2,
            "llama": tiny_models.llama, "bert": tiny_models.bert_classifier}


@pytest.mark.parametrize("unit", ["layer", "block"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_recommend_on_checkpoint_equals_tempbalance_on_model(name, unit, tmp_path):
    model = BUILDERS[name]()
    path = save(model, tmp_path / name)
    doc = recommend(analyze(path, fit="median"), unit=unit)
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1), unit=unit)
    assert sorted(doc["layers"]) == sorted(tb.units) and len(tb.units) >= 2  # a file may store another order
    for u, entry in doc["layers"].items():
        assert tb.multipliers[u] == pytest.approx(entry["multiplier"], abs=1e-9), u
    tb.set_multipliers({u: e["multiplier"] for u, e in doc["layers"].items()})  # a recommend file loads as is
    assert tb.multipliers == {**{u: e["multiplier"] for u, e in doc["layers"].items()}, "default": 1.0}
    assert tb.effective_lrs() == {g["name"]: 0.1 * tb.multipliers[g["unit"]] for g in tb.optimizer.param_groups}


@pytest.mark.parametrize("name", ["gpt2", "mha"])
def test_split_qkv_is_the_same_choice_everywhere(name, tmp_path):
    model = BUILDERS[name]()
    path = save(model, tmp_path / name)
    analysis = analyze(path, fit="median", split_qkv=True)
    doc = recommend(analysis)
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1), split_qkv=True)
    assert sorted(doc["layers"]) == sorted(tb.units)
    fused = [u for u, e in doc["layers"].items() if len(e["layers"]) == 3]
    assert len(fused) == 3  # one fused q/k/v unit per block, the mean of its three parts
    for u in fused:
        assert [n.rsplit(".", 1)[1] for n in doc["layers"][u]["layers"]] == ["q", "k", "v"]
        assert tb.multipliers[u] == pytest.approx(doc["layers"][u]["multiplier"], abs=1e-9)


def test_gpt2_fused_attention_is_split_by_columns(tmp_path):
    """GPT-2's Conv1D stores c_attn as in × 3·out (64 × 192): q, k, v are column blocks."""
    model = tiny_models.gpt2()
    w = model.transformer.h[1].attn.c_attn.weight.detach()  # (64, 192)
    parts = {p: w[:, i * 64:(i + 1) * 64].contiguous() for i, p in enumerate("qkv")}
    direct = analyze({f"{p}.weight": t for p, t in parts.items()}, fit="ks")
    for source in (model, save(model, tmp_path / "gpt2")):
        rows = {r.name: r for r in analyze(source, fit="ks", split_qkv=True).layers}
        for p, row in zip("qkv", direct.layers):
            assert rows[f"transformer.h.1.attn.c_attn.{p}"].alpha == pytest.approx(row.alpha, rel=1e-9)


def units_of(tb):
    return {id(p): g["unit"] for g in tb.optimizer.param_groups for p in g["params"]}


def test_norm_rules_prenorm_transformer_and_batchnorm():
    model = tiny_models.mha_net()
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1))
    unit_of = units_of(tb)
    assert unit_of[id(model.blocks[1].ln_1.weight)] == "default"  # not blocks.0.mlp.2's group
    assert unit_of[id(model.blocks[0].mlp[2].bias)] == "blocks.0.mlp.2"
    assert unit_of[id(model.blocks[0].attn.in_proj_bias)] == "blocks.0.attn.in_proj_weight"
    assert unit_of[id(model.tok_emb.weight)] == "default" and unit_of[id(model.head.weight)] == "default"
    names = {g["name"] for g in tb.optimizer.param_groups}
    assert {"blocks.0.mlp.2", "blocks.0.mlp.2:no_decay", "default", "default:no_decay"} <= names
    net = tiny_models.mha_net()
    unit_of = units_of(TempBalance(net, lambda g: torch.optim.SGD(g, lr=0.1), unit="block"))
    assert unit_of[id(net.blocks[2].ln_1.weight)] == "blocks.2" and unit_of[id(net.blocks[2].mlp[0].bias)] == "blocks.2"
    assert unit_of[id(net.ln_f.weight)] == "default"
    res = resnet()
    unit_of = units_of(TempBalance(res, lambda g: torch.optim.SGD(g, lr=0.1)))
    assert unit_of[id(res.layer1[0].bn1.weight)] == "layer1.0.conv1"  # the BatchNorm after the conv
    assert unit_of[id(res.bn1.weight)] == "default"  # after the stem conv, which is not tuned
    gpt = tiny_models.gpt2()
    unit_of = units_of(TempBalance(gpt, lambda g: torch.optim.SGD(g, lr=0.1)))
    assert unit_of[id(gpt.transformer.h[1].ln_1.weight)] == "default"
    assert unit_of[id(gpt.transformer.h[0].attn.c_attn.bias)] == "transformer.h.0.attn.c_attn"


def test_first_and_last_layers_and_tied_weights():
    resnet_tb = TempBalance(resnet(), lambda g: torch.optim.SGD(g, lr=0.1))
    assert "conv1" not in resnet_tb.units and "linear" not in resnet_tb.units
    assert "layer2.0.shortcut.0" not in resnet_tb.units  # 1×1 conv: 32 eigenvalues < 50
    cnn_tb = TempBalance(cnn(), lambda g: torch.optim.SGD(g, lr=0.1), min_evals=2)
    assert cnn_tb.units == ["features.3", "features.6"]  # no blocks: first (features.0) and last (fc) stay global
    gpt = tiny_models.gpt2()
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    tb = TempBalance(gpt, lambda g: torch.optim.SGD(g, lr=0.1))
    assert all(block_of(u).startswith("transformer.h.") for u in tb.units) and len(tb.units) == 12
    ll = TempBalance(tiny_models.llama(), lambda g: torch.optim.SGD(g, lr=0.1))
    assert "lm_head" not in ll.units and "model.layers.0.self_attn.q_proj" in ll.units
    assert "model.layers.0.self_attn.k_proj" not in ll.units  # 32 × 64: 32 eigenvalues


def test_every_trainable_parameter_in_exactly_one_group():
    for build in BUILDERS.values():
        model = build()
        first = next(model.parameters())
        first.requires_grad_(False)
        tb = TempBalance(model, lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1))
        ids = [id(p) for g in tb.optimizer.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
        no_decay = [g for g in tb.optimizer.param_groups if g["name"].endswith(":no_decay")]
        assert no_decay and all(g["weight_decay"] == 0.0 and all(p.ndim <= 1 or p.ndim == 2 for p in g["params"])
                                for g in no_decay)
        assert all(g["weight_decay"] == 0.1 for g in tb.optimizer.param_groups if ":" not in g["name"]
                   and any(p.ndim >= 2 for p in g["params"]))


def test_recommend_rejects_typo_unit_and_reports_layers():
    from tbdiag.errors import TbdiagError

    analysis = analyze(resnet(), fit="median")
    with pytest.raises(TbdiagError, match="unit 'blocks'"):
        recommend(analysis, unit="blocks")
    doc = recommend(analysis, unit="block")
    assert doc["layers"]["layer1.0"]["layers"] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert math.isfinite(doc["layers"]["layer1.0"]["alpha"])
