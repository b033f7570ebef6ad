"""What TempBalance refuses before anything changes (rates it cannot scale, an unadopted scheduler, meta
weights), another optimizer's layers left alone, and the exact numbers it logs."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch import nn

from tbdiag import TempBalance
from tbdiag.errors import TbdiagError
from tbdiag.tempbalance.logs import log_values, step_rates
from tests import tiny_models

UNITS = ("1.0", "2.0", "3.0")


def mlp(seed: int = 0) -> nn.Sequential:
    """Input, three tuned hidden layers (units 1.0, 2.0, 3.0), output."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), *[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(3)],
                         nn.Linear(64, 4))


def snapshot(opt: torch.optim.Optimizer) -> list[dict]:
    """Every group's settings and parameter identities, and the step hooks: what 'untouched' means."""
    return [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()} for g in opt.param_groups] + [
        {"pre": len(opt._optimizer_step_pre_hooks), "post": len(opt._optimizer_step_post_hooks)}]


def refused(model, opt, match, **options):
    before = copy.deepcopy(snapshot(opt))
    with pytest.raises(TbdiagError, match=match) as info:
        TempBalance(model, opt, **options)
    assert snapshot(opt) == before  # nothing changed: the same optimizer can be used again
    assert "\n" not in str(info.value)
    return str(info.value)


def test_adafactor_with_relative_step_is_refused_before_anything_changes():
    from transformers.optimization import Adafactor

    model = mlp()
    opt = Adafactor(model.parameters(), relative_step=True, lr=None)
    message = refused(model, opt, r"param group 0 of Adafactor has lr=None, computed by the optimizer itself "
                                  r"\(relative_step=True\)")
    assert "relative_step=False, lr=1e-3" in message and "--" not in message
    with pytest.raises(TbdiagError, match="relative_step=True"):  # a factory building it: refused as well
        TempBalance(mlp(), lambda g: Adafactor(g, relative_step=True, lr=None))
    fixed = Adafactor(model.parameters(), relative_step=False, scale_parameter=False, warmup_init=False, lr=1e-3)
    tb = TempBalance(model, fixed, initial={"2.0": 2.0})  # a fixed rate is scaled as any other
    assert tb.effective_lrs()["2.0"] == pytest.approx(2e-3) and tb.effective_lrs()["default"] == pytest.approx(1e-3)


@pytest.mark.parametrize("lr, shown", [(None, "None"), (float("nan"), "nan"), (float("inf"), "inf"), ("0.1", "'0.1'"),
                                       (torch.tensor([0.1]), r"tensor of shape \(1,\)"), (True, "True")])
def test_a_group_whose_lr_is_not_a_number_is_refused(lr, shown):
    model = mlp()
    opt = torch.optim.SGD([{"params": list(model[0].parameters())}, {"params": list(model[1:].parameters())}], lr=0.1)
    opt.param_groups[1]["lr"] = lr
    refused(model, opt, rf"^TempBalance: param group 1 of SGD has lr={shown}, not a number, so there is no rate to "
                        r"scale; give every group a fixed finite lr")


def test_a_zero_dimensional_tensor_lr_is_scaled_like_a_float():
    """torch's Adam takes a 0-d tensor rate; each group steps with it × its multiplier, and the tensor the
    scheduler writes into is back in the group after the step."""
    model, reference = mlp(), mlp()
    rate = torch.tensor(1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=rate)
    mult = {"1.0": 0.5, "2.0": 2.0, "3.0": 1.5}
    tb = TempBalance(model, opt, initial=mult)
    own = dict(zip(map(id, model.parameters()), reference.parameters()))
    ref = torch.optim.Adam([{"params": [own[id(p)] for p in g["params"]], "lr": 1e-2 * mult.get(g["unit"], 1.0)}
                            for g in opt.param_groups])
    x = torch.randn(8, 16)
    for m, o in ((model, opt), (reference, ref)):
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
    assert all(g["lr"] is rate for g in opt.param_groups) and torch.equal(rate, torch.tensor(1e-2))
    assert tb.effective_lrs()["2.0"] == pytest.approx(2e-2)


def test_weight_decay_targets_need_a_weight_decay_to_scale():
    model = mlp()
    refused(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
            r"target='weight_decay' scales weight decay, but every group of AdamW has weight_decay 0", target="weight_decay")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt.param_groups[0]["weight_decay"] = None
    refused(model, opt, r"param group 0 of AdamW has weight_decay=None, not a finite number", target="both")
    lr_none = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    lr_none.param_groups[0]["lr"] = None  # AlphaDecay scales the decay only: the rate is not needed
    tb = TempBalance(model, lr_none, target="weight_decay", initial={"1.0": 3.0})
    assert tb.effective_weight_decays()["1.0"] == pytest.approx(0.3)


def test_a_group_added_later_with_no_rate_is_refused_and_not_added():
    model = mlp()
    frozen = list(model[3].parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if all(p is not q for q in frozen)], lr=0.1)
    TempBalance(model, opt, initial={})
    n = len(opt.param_groups)
    with pytest.raises(TbdiagError, match="param group 1 of SGD has lr=None"):
        opt.add_param_group({"params": frozen, "lr": None})
    assert len(opt.param_groups) == n
    opt.add_param_group({"params": frozen})  # the optimizer's default rate
    assert [g["lr"] for g in opt.param_groups[n:]] == [0.1]


def test_a_scheduler_built_before_and_not_passed_is_refused_and_passing_it_works():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    message = refused(model, opt, r"a learning-rate scheduler \(LambdaLR\) was built over this SGD before TempBalance "
                                  r"and was not passed to it; pass it as schedulers=\[\.\.\.\]")
    tb = TempBalance(model, opt, schedulers=[sched], initial={"2.0": 2.0})
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    for _ in range(3):
        opt.step()
        sched.step()
    assert [s["2.0"] for s in seen] == pytest.approx([0.2, 0.1, 0.05]) and seen[2]["1.0"] == pytest.approx(0.025)
    assert tb.multipliers["2.0"] == 2.0 and "--" not in message


def test_a_plateau_scheduler_built_before_is_refused_and_passing_it_works():
    """ReduceLROnPlateau leaves no mark on the optimizer; it is found as an object built over it."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    refused(model, opt, r"a learning-rate scheduler \(ReduceLROnPlateau\) was built over this SGD")
    TempBalance(model, opt, schedulers=[plateau], initial={"2.0": 2.0})
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    for loss in (1.0, 2.0, 3.0):  # no better after the first: every group's rate halves, the multipliers kept
        opt.step()
        plateau.step(loss)
    assert [s["2.0"] for s in seen] == pytest.approx([0.2, 0.2, 0.1]) and seen[2]["default"] == pytest.approx(0.05)


def test_schedulers_driven_by_a_passed_one_or_gone_are_not_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gone = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    del gone
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    chain = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[2])
    TempBalance(model, opt, schedulers=[chain], initial={"2.0": 2.0})
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    for _ in range(3):
        opt.step()
        chain.step()
    assert [s["2.0"] for s in seen] == pytest.approx([2 * 0.05, 2 * 0.075, 2 * 0.1])


def test_a_timm_style_scheduler_built_before_is_refused():
    class Cosine:  # timm.scheduler.Scheduler's attributes: optimizer, base_values, step(epoch)
        def __init__(self, optimizer):
            self.optimizer, self.base_values = optimizer, [g["lr"] for g in optimizer.param_groups]

        def step(self, epoch):
            pass

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Cosine(opt)
    refused(model, opt, r"scheduler \(Cosine\) was built over this SGD")
    assert sched.base_values == [0.1]


def test_a_scheduler_over_accelerates_wrapper_is_found():
    from accelerate import Accelerator

    model = mlp()
    opt = Accelerator(cpu=True).prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    refused(model, opt.optimizer, r"scheduler \(LambdaLR\) was built over this SGD")
    with pytest.raises(TbdiagError, match=r"scheduler \(LambdaLR\) was built over this SGD"):
        TempBalance(model, opt)
    TempBalance(model, opt, schedulers=[sched], initial={"2.0": 2.0})


def test_a_refusal_keeps_no_scheduler_alive():
    """A REPL keeps the last traceback: once deleted as the message says, the scheduler is gone."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(TbdiagError) as info:
        TempBalance(model, opt)
    kept = info.value.__traceback__
    del sched
    TempBalance(model, opt, initial={})
    assert kept is not None


def test_objects_that_refer_to_the_optimizer_but_schedule_nothing_are_not_refused():
    from unittest import mock

    class Raising:
        optimizer = property(lambda self: 1 / 0)

        def __init__(self, opt):
            self.opt = opt

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    holders = [Raising(opt), mock.MagicMock(optimizer=opt), {"optimizer": opt}]
    TempBalance(model, opt, initial={})
    assert len(holders) == 3

def test_a_loaded_optimizer_state_with_initial_lr_is_no_scheduler():
    """Groups carry initial_lr after loading a checkpoint of a scheduled run, but no scheduler was built over
    this optimizer: accepted, and a scheduler built afterwards drives the split groups."""
    source = mlp()
    first = torch.optim.SGD(source.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(first, lambda s: 1.0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(first.state_dict())
    assert "initial_lr" in opt.param_groups[0]
    TempBalance(model, opt, initial={"3.0": 0.5})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    opt.step()
    sched.step()
    assert seen[0]["3.0"] == pytest.approx(0.1 * 0.1 * 0.5) and seen[0]["default"] == pytest.approx(0.01)


def test_meta_weights_are_refused_with_what_to_do():
    with torch.device("meta"):
        meta = tiny_models.mha_net()
    with pytest.raises(TbdiagError, match=r"^TempBalance: \d+ parameters of this MHANet are on the meta device "
                                          r"\(e.g. tok_emb.weight\).*materialise the weights first"):
        TempBalance(meta, lambda g: torch.optim.SGD(g, lr=0.1))
    partly = mlp()
    partly[2].to("meta")
    opt = torch.optim.SGD([p for p in partly.parameters() if not p.is_meta], lr=0.1)
    refused(partly, opt, r"^TempBalance: 2 parameters of this Sequential are on the meta device \(e.g. 2.0.weight\)")


class Gan(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32))
        self.disc = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 1))


def test_layers_another_optimizer_holds_are_neither_tuned_nor_fitted():
    gan = Gan()
    opt_g, opt_d = torch.optim.Adam(gan.gen.parameters(), lr=1e-3), torch.optim.Adam(gan.disc.parameters(), lr=2e-3)
    before = snapshot(opt_d)
    alone = TempBalance(gan, torch.optim.Adam(gan.gen.parameters(), lr=1e-3))
    assert alone.units == ["gen.1", "gen.2", "disc.1", "disc.2"]  # without others: the discriminator is fitted too
    tb = TempBalance(gan, opt_g, others=[opt_d])
    assert tb.units == ["gen.1", "gen.2"] and sorted(tb.values) == ["gen.1", "gen.2"]
    assert tb.values == {k: alone.values[k] for k in ("gen.1", "gen.2")}
    assert sorted(tb.multipliers.values()) == [0.5, 1.0, 1.5]  # the map spans the generator's layers only
    assert snapshot(opt_d) == before
    d = TempBalance(gan, lambda groups: torch.optim.Adam(groups, lr=1e-3), others=[opt_g])  # a factory: all but G's
    assert d.units == ["disc.1", "disc.2"]
    shared = Gan()  # a layer both optimizers hold is this one's too
    opt_a = torch.optim.Adam(shared.gen.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam([*shared.disc.parameters(), *shared.gen[2].parameters()], lr=1e-3)
    assert TempBalance(shared, opt_a, others=[opt_b]).units == ["gen.1", "gen.2"]


def values_of(tb):
    return [tb.values[t.name] for t in tb.layers]


def test_summary_holds_eight_exact_numbers():
    tb = TempBalance(tiny_models.mha_net(), lambda g: torch.optim.AdamW(g, lr=1e-3), every=1, warmup=1)
    first = log_values(tb)  # before any fit: multipliers 1, no metric yet
    assert first == pytest.approx({"tb/mult_min": 1.0, "tb/mult_max": 1.0, "tb/alpha_mean": math.nan,
                                   "tb/alpha_std": math.nan, "tb/rebalance_s": 0.0, "tb/n_balances": 0.0,
                                   "tb/n_units": 12.0, "tb/n_failed": 0.0}, nan_ok=True, abs=0, rel=0)
    tb.balance()
    alphas = values_of(tb)
    tb.values[tb.layers[3].name] = math.nan  # a failed fit: left out of mean and spread, counted
    finite = alphas[:3] + alphas[4:]
    mean = sum(finite) / len(finite)
    out = log_values(tb)
    assert out == {"tb/mult_min": pytest.approx(0.5), "tb/mult_max": pytest.approx(1.5),
                   "tb/alpha_mean": pytest.approx(mean, rel=1e-12),
                   "tb/alpha_std": pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in finite) / len(finite)), rel=1e-12),
                   "tb/rebalance_s": tb.last_balance_s, "tb/n_balances": 1.0, "tb/n_units": 12.0, "tb/n_failed": 1.0}
    assert out["tb/alpha_std"] != pytest.approx(statistics.stdev(finite), rel=1e-6)  # population, not sample
    assert tb.last_balance_s > 0
    tb.set_multipliers({u: 2.0 + i / 10 for i, u in enumerate(tb.units)})  # all above 1: `default` is no unit
    assert (log_values(tb)["tb/mult_min"], log_values(tb)["tb/mult_max"]) == (2.0, pytest.approx(3.1))


def test_groups_mode_adds_every_group_rate_and_unit_mean_from_the_step_given():
    tb = TempBalance(tiny_models.mha_net(), lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1), unit="block",
                     target="both")
    used = step_rates(tb)
    tb.set_multipliers({"blocks.0": 3.0})  # after the step: the row still shows what the step used
    out = log_values(tb, "groups", used)
    names = [g["name"] for g in tb.optimizer.param_groups]
    summary = {k for k in out if k.startswith("tb/")}
    assert len(summary) == 8 and set(out) == summary | {f"lr/{n}" for n in names} | {f"wd/{n}" for n in names} | {
        f"alpha/blocks.{b}" for b in range(3)}
    assert used.multipliers["blocks.0"] != 3.0
    assert out["lr/blocks.0"] == pytest.approx(1e-3 * used.multipliers["blocks.0"], rel=1e-12)
    assert out["wd/blocks.0"] == pytest.approx(0.1 * used.multipliers["blocks.0"])
    assert out["tb/mult_max"] == max(used.multipliers.values())
    layers = [t.name for t in tb.layers if t.unit == "blocks.1"]
    assert out["alpha/blocks.1"] == pytest.approx(sum(tb.values[n] for n in layers) / len(layers), rel=1e-12)
    with pytest.raises(TbdiagError, match=r"log='group'; use one of 'summary', 'groups'"):
        log_values(tb, "group")


def test_per_update_with_only_epoch_steps_says_so_once(caplog):
    """step(epoch) counts epochs; a per='update' balancer whose step_update is never called would never
    rebalance: one warning names the counter to call."""
    import logging

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    tb = TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1), per="update", every=1, warmup=1)
    with caplog.at_level(logging.WARNING, logger="tbdiag.tempbalance.guards"):
        tb.step()
        tb.step()
    assert [r.getMessage().count("step_update") for r in caplog.records] == [2]
    caplog.clear()
    tb.step_update(1)
    assert tb.n_balances == 1 and not caplog.records


@pytest.mark.parametrize("device", ["bogus", "tpu", *([] if torch.cuda.is_available() else ["cuda"])])
def test_a_bad_device_is_refused_before_the_optimizer_changes(device):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(TbdiagError, match="device"):
        TempBalance(model, opt, device=device)
    assert len(opt.param_groups) == len(before) and opt.param_groups[0]["lr"] == 0.1
    TempBalance(model, opt, device="cpu")  # a retry with a good device works: nothing was split
