import math

import pytest
import torch
from torch import nn

from tbdiag import TempBalance
from tbdiag.errors import TbdiagError
from tbdiag.tempbalance import MAPS, block_of, multipliers
from tbdiag.train.models import MODELS

ALPHAS = [2.1, 3.4, 2.8, 5.0, 4.2, 2.5]


@pytest.mark.parametrize("name", list(MAPS))
def test_maps_rise_with_alpha_and_stay_in_range(name):
    m = multipliers(ALPHAS, name, 0.5, 1.5)
    order = sorted(range(len(ALPHAS)), key=ALPHAS.__getitem__)
    assert all(m[a] < m[b] for a, b in zip(order, order[1:]))
    if name in ("linear", "step", "sigmoid"):
        assert all(0.5 <= x <= 1.5 for x in m)
    if name in ("sqrt", "log2"):
        assert sum(m) / len(m) == pytest.approx(1.0)


def test_linear_map_parity_and_all_equal_case():
    m = multipliers(ALPHAS, "linear", 0.5, 1.5)
    lo, hi = min(ALPHAS), max(ALPHAS)
    assert m == pytest.approx([0.5 + (a - lo) / (hi - lo) for a in ALPHAS])
    assert multipliers([3.0, 3.0, 3.0], "linear") == [1.0, 1.0, 1.0]
    assert multipliers([2.0, math.nan, 4.0]) == [0.5, 1.0, 1.5]


def test_other_maps_formulas():
    assert multipliers(ALPHAS, "sqrt") == pytest.approx([len(ALPHAS) * math.sqrt(a) / sum(map(math.sqrt, ALPHAS)) for a in ALPHAS])
    assert multipliers([1.0, 2.0, 3.0, 4.0], "step", 0.5, 1.5) == pytest.approx([0.5, 0.75, 1.0, 1.25])
    sig = multipliers([2.0, 3.0, 4.0], "sigmoid", 0.5, 1.5)
    assert sig[1] == pytest.approx(1.0)
    assert sig[2] == pytest.approx(10 ** (2 * math.log10(1.5) * (1 / (1 + math.exp(-10)) - 0.5)))
    with pytest.raises(TbdiagError, match="unknown map"):
        multipliers(ALPHAS, "cubic")
    with pytest.raises(TbdiagError, match="min_ratio"):
        multipliers(ALPHAS, "linear", 1.5, 0.5)


def small_resnet():
    torch.manual_seed(0)
    return MODELS["resnet18"](num_classes=10, width=0.25)


def test_block_unit_for_transformer_stacks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.up = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 128)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 64)
            self.layers = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(64, 5)

    assert block_of("model.layers.3.mlp.up") == "model.layers.3" and block_of("fc") == "fc"
    torch.manual_seed(0)
    model = Stack()
    tb = TempBalance(model, lambda g: torch.optim.AdamW(g, lr=1e-3), unit="block")
    assert tb.units == ["layers.0", "layers.1", "layers.2"]
    mult = sorted(tb.balance().values())
    assert mult[0] == pytest.approx(0.5) and mult[2] == pytest.approx(1.5) and 0.5 < mult[1] < 1.5
    means = [sum(tb.values[f"layers.{b}.{n}"] for n in ("q", "k", "up")) / 3 for b in range(3)]
    assert multipliers(means) == pytest.approx([tb.multipliers[f"layers.{b}"] for b in range(3)])
    tbw = TempBalance(model, lambda g: torch.optim.AdamW(g, lr=1e-3), metric="alpha_weighted")
    assert len(tbw.units) == 9


def test_effective_lr_is_base_schedule_times_scale():
    """One SGD step with TempBalance equals a plain SGD step at lr = base(t) × multiplier, per group."""
    model = small_resnet()
    reference = small_resnet()
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=5e-4), no_decay=False)
    warm = torch.optim.lr_scheduler.LinearLR(tb.optimizer, start_factor=0.1, total_iters=2)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(tb.optimizer, T_max=5)
    sched = torch.optim.lr_scheduler.SequentialLR(tb.optimizer, [warm, cos], milestones=[2])
    by_unit = {g["unit"]: g["params"] for g in tb.optimizer.param_groups}
    own = dict(zip((id(p) for p in model.parameters()), reference.parameters()))
    ref_opt = torch.optim.SGD([{"params": [own[id(p)] for p in ps], "name": u} for u, ps in by_unit.items()],
                              lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_sched = torch.optim.lr_scheduler.SequentialLR(
        ref_opt, [torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=0.1, total_iters=2),
                  torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5)], milestones=[2])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(4):
        scales = tb.multipliers
        base = [g["lr"] for g in ref_opt.param_groups]
        for g, b in zip(ref_opt.param_groups, base):
            g["lr"] = b * scales[g["name"]]
        for m, opt in ((model, tb.optimizer), (reference, ref_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        for g, b in zip(ref_opt.param_groups, base):
            g["lr"] = b
        assert [g["lr"] for g in tb.optimizer.param_groups] == pytest.approx(base)  # base lr between steps
        sched.step()
        ref_sched.step()
        tb.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, q, atol=1e-6)
    assert len(set(round(v, 6) for v in tb.multipliers.values())) > 3


def test_counters_every_warmup_and_timing():
    model = small_resnet()
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1), every=3, per="update", warmup=4)
    assert tb.n_balances == 0 and set(tb.multipliers.values()) == {1.0}  # no balance during the warm-up
    done = [n for n in range(1, 13) if tb.step_update(n)]
    assert done == [6, 9, 12] and tb.n_balances == 3
    assert not tb.step(5) and tb.n_balances == 3  # epochs do not count with per="update"
    assert tb.last_balance_s > 0 and tb.total_balance_s >= tb.last_balance_s
    assert tb.step_update() is False and tb.updates == 13  # counts on from the last value
    epochs = TempBalance(small_resnet(), lambda g: torch.optim.SGD(g, lr=0.1), every=2)
    assert epochs.n_balances == 1  # balanced at once without a warm-up
    assert [e for e in range(1, 7) if epochs.step()] == [2, 4, 6]
    assert epochs.step(8) and epochs.epoch == 8 and not epochs.step_update(8)
    logged = epochs.log_values()
    assert logged["lr/layer1.0.conv1"] == pytest.approx(0.1 * epochs.multipliers["layer1.0.conv1"])
    assert logged["alpha/layer1.0.conv1"] == pytest.approx(epochs.values["layer1.0.conv1"], rel=1e-12)
    assert logged["tb/rebalance_s"] == epochs.last_balance_s > 0 and logged["tb/n_balances"] == epochs.n_balances == 5
    with pytest.raises(TbdiagError, match="per 'step'"):
        TempBalance(small_resnet(), lambda g: torch.optim.SGD(g, lr=0.1), per="step")


def test_existing_optimizer_is_regrouped_and_adamw_works():
    model = small_resnet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    tb = TempBalance(model, opt, map="sqrt")
    assert tb.optimizer is opt and all("name" in g for g in opt.param_groups)
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    reference = small_resnet()
    own = dict(zip(map(id, model.parameters()), reference.parameters()))
    ref = torch.optim.AdamW([{"params": [own[id(p)] for p in g["params"]], "lr": 1e-3 * tb.multipliers[g["unit"]]}
                             for g in opt.param_groups], weight_decay=0.05)  # each unit at its own fixed rate
    x = torch.randn(2, 3, 32, 32)
    for m, o in ((model, opt), (reference, ref)):
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
    assert len({round(m, 6) for m in tb.multipliers.values()}) > 3
    partial = small_resnet()
    conv = partial.layer1[0].conv1.weight
    only_conv = torch.optim.SGD([{"params": [conv], "lr": 0.1}], lr=0.1)
    tb = TempBalance(partial, only_conv)  # parameters outside the optimizer are simply not trained
    assert [g["name"] for g in only_conv.param_groups] == ["layer1.0.conv1"]
    start = [p.detach().clone() for p in partial.parameters()]
    conv.grad = torch.ones_like(conv)
    only_conv.step()
    assert torch.allclose(conv, start[[p is conv for p in partial.parameters()].index(True)] - 0.1 *
                          tb.multipliers["layer1.0.conv1"], rtol=0, atol=1e-7) and tb.multipliers["layer1.0.conv1"] != 1


def test_state_dict_roundtrip_and_bad_multipliers():
    model = small_resnet()
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1), every=2)
    tb.step()
    state = tb.state_dict()
    other = TempBalance(small_resnet(), lambda g: torch.optim.SGD(g, lr=0.1), initial={}, every=2)
    other.load_state_dict(state)
    assert other.multipliers == tb.multipliers and other.epoch == 1
    assert other.step() and other.n_balances == 2  # the second epoch is due, as it would have been
    with pytest.raises(TbdiagError, match="no such tuned unit"):
        tb.set_multipliers({"encoder.fc9": 1.2})
    with pytest.raises(TbdiagError, match="not a positive number"):
        tb.set_multipliers({"layer1.0.conv1": -1})


def test_spectral_norm_metric_and_keep_first_last():
    model = small_resnet()
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1), metric="spectral_norm", include_first_last=True,
                     min_evals=2)
    assert "linear" in tb.units and tb.units[0] == "conv1"
    from tbdiag import analyze

    norms = {row.name: row.lambda_max for row in analyze(model, fit="median", min_evals=2).layers}
    assert tb.values == pytest.approx({name: norms[name] for name in tb.values}, rel=1e-9)
    assert min(tb.multipliers.values()) == 0.5 and max(tb.multipliers.values()) == 1.5
