"""Tests written against surviving mutants of benchmarks/mutation.sh (tempbalance modules): each checks a value a planted bug changes."""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tbdiag import TempBalance
from tbdiag.errors import TbdiagError
from tbdiag.tempbalance.logs import log_values
from tests.test_tempbalance_edges import UNITS, Gan, mlp, refused


# --- balancer ---------------------------------------------------------------------------------------------------


def test_a_callable_optimizer_is_split_not_called_as_a_factory():
    """Only a callable without param groups is a factory ``groups -> Optimizer``."""
    class CallableSGD(torch.optim.SGD):
        def __call__(self, groups):
            raise AssertionError("an optimizer is not a factory")

    model = mlp()
    opt = CallableSGD(model.parameters(), lr=0.1)
    tb = TempBalance(model, opt, initial={"2.0": 2.0})
    assert tb.optimizer is opt and tb.effective_lrs() == pytest.approx({"default": 0.1, "1.0": 0.1, "2.0": 0.2,
                                                                        "3.0": 0.1})


def test_an_optimizer_a_factory_builds_without_a_rate_is_refused_by_its_name():
    def factory(groups):
        opt = torch.optim.SGD(groups, lr=0.1)
        opt.param_groups[1]["lr"] = None
        return opt

    with pytest.raises(TbdiagError, match=r"^TempBalance: param group 1 of SGD has lr=None, not a number"):
        TempBalance(mlp(), factory)


def test_lbfgs_is_refused_with_the_whole_reason():
    model = mlp()
    with pytest.raises(TbdiagError) as info:
        TempBalance(model, torch.optim.LBFGS(model.parameters()))
    assert str(info.value) == ("LBFGS keeps a single param group, so it cannot step layers at their own rates; use "
                               "another optimizer with TempBalance")


def test_an_optimizer_of_another_model_is_refused_with_what_to_do():
    with pytest.raises(TbdiagError) as info:
        TempBalance(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1))
    assert str(info.value) == ("the optimizer holds none of this model's parameters; build it over the model "
                               "TempBalance is given (model.parameters(), or its param groups)")


def test_trainable_parameters_left_out_of_the_optimizer_are_reported(caplog):
    model = mlp()
    model[0].requires_grad_(False)  # frozen and left out: not reported
    opt = torch.optim.SGD([*model[1:3].parameters(), *model[4].parameters()], lr=0.1)
    with caplog.at_level(logging.INFO, logger="tbdiag.tempbalance.balancer"):
        TempBalance(model, opt, initial={})
    assert [r.getMessage() for r in caplog.records] == [
        "TempBalance: 2 trainable parameters are not in the optimizer (e.g. 3.0.weight)"]


def test_a_factory_built_optimizer_saved_and_loaded_keeps_the_current_multipliers():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), warmup=1, no_decay=False)
    tb.set_multipliers({"2.0": 2.0})
    tb.optimizer.load_state_dict(tb.optimizer.state_dict())
    assert tb.effective_lrs()["2.0"] == pytest.approx(0.2)


def test_a_factory_built_optimizer_adopts_schedulers_and_groups_added_later():
    model = mlp()
    frozen = list(model[3].parameters())
    for p in frozen:
        p.requires_grad_(False)
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1), initial={"3.0": 2.0}, no_decay=False)
    sched = torch.optim.lr_scheduler.LambdaLR(tb.optimizer, lambda s: 0.5)
    tb.adopt_scheduler(sched)
    for p in frozen:
        p.requires_grad_(True)
    tb.optimizer.add_param_group({"params": frozen, "lr": 0.4})
    assert tb.effective_lrs()["3.0:g3"] == pytest.approx(0.8) and tb.effective_lrs()["1.0"] == pytest.approx(0.05)


@pytest.mark.parametrize("option, message", [
    ({"target": "decay"}, "target 'decay': use one of lr, weight_decay, both"),
    ({"metric": "alpha_hat"}, "metric 'alpha_hat': use one of alpha, alpha_weighted, spectral_norm"),
    ({"per": "step"}, "per 'step': use epoch or update"),
    ({"every": -1}, "every -1, warmup 0: must be whole numbers ≥ 0"),
    ({"every": 1.5}, "every 1.5, warmup 0: must be whole numbers ≥ 0"),
    ({"warmup": -1}, "every 1, warmup -1: must be whole numbers ≥ 0"),
    ({"warmup": "10"}, "every 1, warmup '10': must be whole numbers ≥ 0"),
])
def test_a_bad_option_is_refused_with_what_is_allowed(option, message):
    model = mlp()
    assert refused(model, torch.optim.SGD(model.parameters(), lr=0.1), None, **option) == message


def test_ratios_the_map_cannot_use_are_refused_before_any_fit():
    model = mlp()
    message = refused(model, torch.optim.SGD(model.parameters(), lr=0.1), None, min_ratio=1.2, max_ratio=0.8,
                      warmup=5)
    assert message.startswith("ratios min_ratio=1.2, max_ratio=0.8: need finite numbers with")


def test_by_default_every_epoch_rebalances():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1))
    assert tb.step() and tb.step() and tb.n_balances == 3


class FusedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.qkv, self.proj, self.out = nn.Linear(16, 64), nn.Linear(64, 192), nn.Linear(64, 64), nn.Linear(64, 4)


def test_a_fused_qkv_projection_is_one_layer_unless_split_qkv():
    tb = TempBalance(FusedAttention(), lambda g: torch.optim.SGD(g, lr=0.1))
    assert sorted(tb.values) == ["proj", "qkv"]
    split = TempBalance(FusedAttention(), lambda g: torch.optim.SGD(g, lr=0.1), split_qkv=True)
    assert sorted(split.values) == ["proj", "qkv.k", "qkv.q", "qkv.v"]


def test_include_and_exclude_choose_the_tuned_layers():
    included = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), include=["2.*", "3.*"])
    excluded = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), exclude=["2.*"])
    assert (included.units, excluded.units) == (["2.0", "3.0"], ["1.0", "3.0"])


def test_the_default_fit_is_the_median_estimator():
    import tbdiag

    model = mlp()
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1))
    median = {row.name: row.alpha for row in tbdiag.analyze(model, fit="median").layers}
    ks = {row.name: row.alpha for row in tbdiag.analyze(model, fit="ks").layers}
    assert tb.values == pytest.approx({u: median[u] for u in UNITS}, rel=1e-12) and tb.values["2.0"] != ks["2.0"]


def test_layers_with_two_eigenvalues_are_fitted_when_min_evals_allows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(2, 3), nn.Linear(3, 4))
    tb = TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1), min_evals=2)
    assert sorted(tb.values) == ["1", "2", "3"] and all(math.isfinite(v) for v in tb.values.values())


def test_a_model_without_a_layer_to_tune_is_refused_with_what_to_try():
    model = torch.nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 4))
    assert refused(model, torch.optim.SGD(model.parameters(), lr=0.1), None, min_evals=10) == (
        "no layer to tune in this Sequential: TempBalance tunes Linear and Conv layers with ≥ 10 eigenvalues, the input "
        "and output layers left out (parametrized ones such as weight_norm are not seen, nor layers of other "
        "optimizers); lower min_evals, keep the first and last layers, or check include/exclude")


def test_an_optimizer_without_weight_decay_reports_zero_decay_per_group():
    """Rprop has no ``weight_decay`` setting: every group steps without decay, whatever its multiplier."""
    model = mlp()
    tb = TempBalance(model, torch.optim.Rprop(model.parameters(), lr=0.01), initial={"2.0": 2.0})
    assert "weight_decay" not in tb.optimizer.param_groups[0]
    assert tb.effective_weight_decays() == {"default": 0.0, "1.0": 0.0, "2.0": 0.0, "3.0": 0.0}


def test_the_log_values_method_gives_group_rates_and_unit_alphas_by_default():
    model = mlp()
    tb = TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1))
    out = tb.log_values()
    assert {k for k in out if not k.startswith("tb/")} == {"lr/default", *(f"lr/{u}" for u in UNITS),
                                                           *(f"alpha/{u}" for u in UNITS)}
    assert out["lr/2.0"] == pytest.approx(0.1 * tb.multipliers["2.0"]) and out["alpha/3.0"] == tb.values["3.0"]
    assert len(tb.log_values("summary")) == 8


def test_an_old_state_counting_calls_restores_the_epoch():
    """States of earlier versions counted epochs as ``calls``; the next epoch continues from there."""
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), every=2, initial={})
    tb.load_state_dict({"calls": 3, "multipliers": {"2.0": 1.25}})
    assert tb.epoch == 3 and tb.multipliers["2.0"] == 1.25
    assert tb.step() and tb.epoch == 4 and tb.n_balances == 1  # epoch 4 is due with every=2


def test_a_state_with_multipliers_only_starts_every_counter_at_zero():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), every=2)
    tb.step_update(5)
    tb.load_state_dict({"multipliers": {"1.0": 0.75}})
    assert (tb.epoch, tb.updates, tb.n_balances, tb.total_balance_s, tb.values) == (0, 0, 0, 0.0, {})
    assert tb.multipliers["1.0"] == 0.75 and not tb.step()  # epoch 1: not due with every=2


def test_a_state_round_trip_continues_every_counter():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), every=2, per="update")
    for _ in range(3):
        tb.step_update()
    tb.step(4)
    state = tb.state_dict()
    assert set(state) == {"epoch", "updates", "multipliers", "values", "n_balances", "total_balance_s"}
    other = TempBalance(mlp(1), lambda g: torch.optim.SGD(g, lr=0.1), every=2, per="update", initial={})
    other.load_state_dict(state)
    assert (other.epoch, other.updates, other.n_balances) == (4, 3, 2)
    assert other.total_balance_s == tb.total_balance_s > 0 and other.values == tb.values
    assert other.step_update() and other.updates == 4 and other.n_balances == 3


def test_step_update_counts_one_more_or_takes_the_number_given():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), every=3, per="update", warmup=1)
    assert [tb.step_update() for _ in range(3)] == [False, False, True] and tb.updates == 3
    assert not tb.step_update(7) and tb.updates == 7
    assert tb.step_update(9) and tb.updates == 9 and tb.n_balances == 2


def test_step_takes_the_epoch_given():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), every=4, warmup=1)
    assert tb.step(4) and tb.epoch == 4
    assert not tb.step(6) and tb.epoch == 6 and not tb.step() and tb.step() and tb.epoch == 8


def test_every_zero_never_rebalances():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), every=0, initial={"2.0": 1.5})
    assert not any([tb.step(), tb.step(2), tb.step_update(1)])
    assert tb.n_balances == 0 and tb.multipliers["2.0"] == 1.5


def test_a_per_epoch_balancer_stepped_by_epoch_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="tbdiag.tempbalance.guards"):
        tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), every=1, warmup=1)
        assert tb.step() and tb.step()
    assert tb.updates == 0 and caplog.records == []


def test_max_ratio_sets_the_highest_multiplier():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), min_ratio=0.25, max_ratio=2.0)
    lowest, _, highest = sorted(tb.multipliers[u] for u in UNITS)
    assert (lowest, highest) == (pytest.approx(0.25), pytest.approx(2.0))


def test_rebalance_time_is_the_duration_of_each_and_their_sum():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), warmup=1)
    spans, lasts = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        tb.balance()
        spans.append(time.perf_counter() - t0)
        lasts.append(tb.last_balance_s)
    assert all(0 < last <= span for last, span in zip(lasts, spans))
    assert tb.total_balance_s == pytest.approx(sum(lasts), rel=1e-12)


def test_each_rebalance_is_reported_at_info_level(caplog):
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), warmup=1)
    with caplog.at_level(logging.INFO, logger="tbdiag.tempbalance.balancer"):
        tb.balance()
    assert [r.getMessage() for r in caplog.records] == [
        f"TempBalance: 3 units rebalanced from alpha in {tb.last_balance_s:.3f} s"]


def test_groups_added_later_under_a_name_already_taken_get_a_numbered_name():
    model = mlp()
    opt = torch.optim.SGD(model[:2].parameters(), lr=0.1)
    tb = TempBalance(model, opt, initial={"2.0": 2.0})
    opt.add_param_group({"params": [model[2][0].weight], "name": "late"})
    opt.add_param_group({"params": [model[2][0].bias], "name": "late", "lr": 0.3})
    assert [g["name"] for g in opt.param_groups[-2:]] == ["2.0:late", "2.0:late.2"]
    assert tb.effective_lrs()["2.0:late.2"] == pytest.approx(0.6)


def rates_seen_in_steps(opt):
    """The lr of every group as each later optimizer step uses it (after TempBalance's pre-hook)."""
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    return seen


def test_groups_added_later_step_at_their_units_multiplier():
    """Unit 3.0 was set to 2 while frozen; unit 2.0, unknown until its group is added, starts at 1."""
    model = mlp()
    opt = torch.optim.SGD([*model[:2].parameters(), *model[4].parameters()], lr=0.1)
    TempBalance(model, opt, warmup=1, initial={"3.0": 2.0})
    opt.add_param_group({"params": [*model[2].parameters(), *model[3].parameters()]})
    seen = rates_seen_in_steps(opt)
    opt.step()
    assert seen[0]["2.0:g1"] == pytest.approx(0.1) and seen[0]["3.0:g1"] == pytest.approx(0.2)


def test_groups_added_later_are_left_to_a_scheduler_that_applies_lr_scale():
    """apply_scale=False (timm's scheduler multiplies by lr_scale itself): the step hook leaves every rate alone."""
    model = mlp()
    opt = torch.optim.SGD([*model[:3].parameters(), *model[4].parameters()], lr=0.1)
    TempBalance(model, opt, apply_scale=False, initial={"3.0": 2.0})
    opt.add_param_group({"params": list(model[3].parameters())})
    seen = rates_seen_in_steps(opt)
    opt.step()
    assert opt.param_groups[-1]["lr_scale"] == 2.0 and seen[0]["3.0:g1"] == pytest.approx(0.1)


# --- logs -------------------------------------------------------------------------------------------------------


def test_weight_decay_is_logged_only_when_it_is_a_target():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    by_lr = log_values(TempBalance(model, opt, initial={"2.0": 2.0}), "groups")
    assert by_lr["lr/2.0"] == pytest.approx(2e-3) and not [k for k in by_lr if k.startswith("wd/")]
    other = mlp()
    by_wd = log_values(TempBalance(other, torch.optim.AdamW(other.parameters(), lr=1e-3, weight_decay=0.1),
                                   target="weight_decay", initial={"2.0": 2.0}), "groups")
    assert by_wd["wd/2.0"] == pytest.approx(0.2) and by_wd["wd/1.0"] == pytest.approx(0.1)
    assert by_wd["lr/2.0"] == pytest.approx(1e-3)


def test_before_the_first_fit_groups_mode_has_rates_and_no_unit_alphas():
    model = mlp()
    tb = TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup=1)
    out = log_values(tb, "groups")
    assert set(out) - {k for k in out if k.startswith("tb/")} == {"lr/default", *(f"lr/{u}" for u in UNITS)}


def test_an_unknown_log_mode_is_refused_by_where_it_was_asked():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), warmup=1)
    with pytest.raises(TbdiagError) as info:
        log_values(tb, "group")
    assert str(info.value) == "TempBalance.log_values: log='group'; use one of 'summary', 'groups'"


def test_a_frozen_unit_without_a_multiplier_counts_as_one_in_the_range():
    """Unit 2.0 is tuned but frozen (no group): before a fit it has no multiplier; the summary counts it as 1."""
    model = mlp()
    model[2].requires_grad_(False)
    tb = TempBalance(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), warmup=1)
    tb.set_multipliers({"1.0": 3.0, "3.0": 2.0})
    assert "2.0" in tb.units and "2.0" not in tb.multipliers
    out = log_values(tb)
    assert (out["tb/mult_min"], out["tb/mult_max"]) == (1.0, 3.0)


# --- guards: multipliers, rates, the update counter --------------------------------------------------------------


def test_multipliers_for_units_of_another_model_are_refused_with_the_first_three_of_each():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])  # tuned: 1, 2, 3, 4
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1), warmup=1)
    with pytest.raises(TbdiagError) as info:
        tb.set_multipliers({"0.0": 1.1, "7": 1.2, "9.0": 1.3, "8.0": 1.4, "2": 1.5})
    assert str(info.value) == ("multipliers for 0.0, 7, 9.0: no such tuned unit in this model (tuned: 1, 2, 3 …); "
                               "recommend from this model's checkpoint with the same unit and layer options")
    assert tb.multipliers["2"] == 1.0


def test_the_default_group_takes_only_the_multiplier_one():
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), warmup=1)
    tb.set_multipliers({"default": 1.0, "2.0": 1.5})
    assert tb.multipliers["2.0"] == 1.5
    with pytest.raises(TbdiagError, match=r"^multipliers for default: no such tuned unit"):
        tb.set_multipliers({"default": 2.0})


@pytest.mark.parametrize("value", [True, 0, -1.0, float("inf"), float("nan"), "1.5", None])
def test_a_multiplier_that_is_no_positive_number_is_refused(value):
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), warmup=1)
    with pytest.raises(TbdiagError) as info:
        tb.set_multipliers({"1.0": 2.0, "2.0": value})
    assert str(info.value) == f"multiplier of 2.0: {value!r} is not a positive number"


@pytest.mark.parametrize("lr, shown", [(-0.1, "-0.1"), (torch.tensor(1), "tensor(1)")])
def test_a_negative_or_integer_rate_is_refused(lr, shown):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = lr
    assert refused(model, opt, None).startswith(f"TempBalance: param group 0 of SGD has lr={shown}, not a number")


def test_a_rate_on_the_meta_device_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    with pytest.raises(TbdiagError, match=r"^TempBalance: param group 0 of SGD has lr=tensor\(\.\.\., device='meta', "
                                          r"size=\(\)\), not a number"):
        TempBalance(model, opt)
    assert len(opt.param_groups) == 1


def test_an_optimizer_without_weight_decay_cannot_be_scaled_by_decay():
    model = mlp()
    message = refused(model, torch.optim.Rprop(model.parameters(), lr=0.01), None, target="weight_decay")
    assert message.startswith("TempBalance: target='weight_decay' scales weight decay, but every group of Rprop has "
                              "weight_decay 0")


def test_a_rate_the_optimizer_computes_itself_is_refused_even_when_a_schedule_wrote_a_number():
    """AdafactorSchedule writes lr=0.0 into the groups; the rate is still Adafactor's own (relative_step=True)."""
    optimization = pytest.importorskip("transformers.optimization")
    Adafactor, AdafactorSchedule = optimization.Adafactor, optimization.AdafactorSchedule

    model = mlp()
    opt = Adafactor(model.parameters(), relative_step=True, warmup_init=True, lr=None)
    schedule = AdafactorSchedule(opt)
    assert refused(model, opt, None, schedulers=[schedule]) == (
        "TempBalance: param group 0 of Adafactor has lr=0.0, computed by the optimizer itself (relative_step=True), "
        "so there is no rate to scale; give every group a fixed finite lr (e.g. Adafactor(..., relative_step=False, "
        "lr=1e-3)) or train without TempBalance")


def test_a_negative_weight_decay_is_refused_by_its_value():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt.param_groups[0]["weight_decay"] = -0.1
    assert refused(model, opt, None, target="weight_decay") == (
        "TempBalance: param group 0 of AdamW has weight_decay=-0.1, not a finite number ≥ 0 to scale; set a numeric "
        "weight_decay")


def test_the_weight_decay_is_not_checked_when_only_the_rate_is_scaled():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt.param_groups[0]["weight_decay"] = None
    tb = TempBalance(model, opt, initial={"2.0": 2.0})
    assert tb.effective_lrs()["2.0"] == pytest.approx(2e-3)


def test_meta_weights_are_refused_with_the_whole_remedy():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(TbdiagError) as info:
        TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1))
    assert str(info.value) == (
        "TempBalance: 10 parameters of this Sequential are on the meta device (e.g. 0.weight), so they hold no values "
        "to fit; materialise the weights first (load them, or model.to_empty(device=...) and initialise) and then "
        "build TempBalance")


def test_a_per_update_balancer_stepped_by_epoch_says_what_to_call(caplog):
    tb = TempBalance(mlp(), lambda g: torch.optim.SGD(g, lr=0.1), per="update", every=1, warmup=1)
    with caplog.at_level(logging.WARNING, logger="tbdiag.tempbalance.guards"):
        tb.step()
    assert [r.getMessage() for r in caplog.records] == [
        "TempBalance(per='update') rebalances on step_update(num_updates), which has not been called; step(epoch) "
        "only counts epochs: call step_update after each optimizer update, or use per='epoch'"]


# --- guards: schedulers built over the optimizer (check_schedulers, built_over, _with_children) -------------------


def scheduler_names_in(message: str) -> list[str]:
    return sorted(re.search(r"scheduler \((.*?)\) was built", message).group(1).split(", "))


def test_every_scheduler_built_before_and_not_passed_is_named():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(TbdiagError) as neither:
        TempBalance(model, opt)
    assert scheduler_names_in(str(neither.value)) == ["LambdaLR", "ReduceLROnPlateau"]
    with pytest.raises(TbdiagError) as one:
        TempBalance(model, opt, schedulers=[lam])
    assert scheduler_names_in(str(one.value)) == ["ReduceLROnPlateau"]
    assert TempBalance(model, opt, schedulers=[lam, plateau], initial={}).optimizer is opt


def test_a_scheduler_not_passed_is_refused_with_both_remedies():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert refused(model, opt, None) == (
        "TempBalance: a learning-rate scheduler (LambdaLR) was built over this SGD before TempBalance and was not "
        "passed to it; pass it as schedulers=[...] so it follows the split groups, or build it after TempBalance")
    assert sched.optimizer is opt


def test_a_scheduler_whose_state_was_loaded_is_still_found():
    """Loading (or saving) a scheduler's state gives it a ``__dict__`` object: the optimizer is then
    referred to by that dict, not by the scheduler itself."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    sched.load_state_dict(sched.state_dict())
    with pytest.raises(TbdiagError, match=r"scheduler \(StepLR\) was built over this SGD"):
        TempBalance(model, opt)


def test_a_scheduler_left_in_a_reference_cycle_is_garbage_and_not_refused():
    """A dropped scheduler that a reference cycle still holds steps nothing: it is collected, not refused."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.disable()  # no automatic collection between the drop and the check
    try:
        holder = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)}
        holder["self"] = holder
        del holder
        tb = TempBalance(model, opt, initial={"2.0": 2.0})
    finally:
        gc.enable()
    assert tb.effective_lrs()["2.0"] == pytest.approx(0.1)  # the dropped scheduler's 0.5: lr 0.05, × 2


def test_a_scheduler_passed_inside_a_wrapper_is_not_refused():
    """accelerate's AcceleratedScheduler keeps the real one under ``.scheduler``: passing the wrapper passes it."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inner = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    TempBalance(model, opt, schedulers=[SimpleNamespace(scheduler=inner)], initial={"2.0": 2.0})
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    opt.step()
    inner.step()
    opt.step()
    assert [s["2.0"] for s in seen] == pytest.approx([0.2, 0.1])


def test_an_optimizer_wrapper_kept_alive_is_no_scheduler():
    """accelerate's AcceleratedOptimizer refers to the optimizer (``.optimizer``) but schedules nothing."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = SimpleNamespace(optimizer=opt)
    tb = TempBalance(model, opt, initial={"2.0": 2.0})
    assert wrapper.optimizer is tb.optimizer and tb.effective_lrs()["2.0"] == pytest.approx(0.2)


def loaded_optimizer(params):
    """An optimizer whose groups carry initial_lr from a loaded state of a scheduled run, and no scheduler."""
    params = list(params)
    source = torch.optim.SGD(params, lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(source, lambda s: 1.0)
    opt = torch.optim.SGD(params, lr=0.1)
    opt.load_state_dict(source.state_dict())
    return opt


def tempbalance_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_loaded_state_with_initial_lr_is_reported_once(caplog):
    model = mlp()
    with caplog.at_level(logging.WARNING, logger="tbdiag.tempbalance.guards"):
        TempBalance(model, loaded_optimizer(model.parameters()), initial={})
    assert tempbalance_warnings(caplog) == [
        "TempBalance: the optimizer's groups carry initial_lr (a loaded state, or a scheduler built before); pass "
        "any scheduler built over them as schedulers=[...]"]


def test_initial_lr_in_one_group_only_is_reported(caplog):
    """A group added after the state was loaded has no initial_lr; the others still say a scheduler ran."""
    model = mlp()
    opt = loaded_optimizer(model[:3].parameters())
    opt.add_param_group({"params": list(model[3:].parameters())})
    with caplog.at_level(logging.WARNING, logger="tbdiag.tempbalance.guards"):
        TempBalance(model, opt, initial={})
    assert "initial_lr" not in opt.param_groups[-1] and len(tempbalance_warnings(caplog)) == 1


def test_initial_lr_from_a_passed_scheduler_is_not_reported(caplog):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with caplog.at_level(logging.WARNING, logger="tbdiag.tempbalance.guards"):
        TempBalance(model, opt, schedulers=[sched], initial={})
    assert "initial_lr" in opt.param_groups[0] and tempbalance_warnings(caplog) == []


# --- integrations.hf: the callback's hooks called as the Trainer calls them --------------------------------------


def hf_callback(**options):
    hf = pytest.importorskip("tbdiag.integrations.hf")
    return hf.TempBalanceCallback(**options)


def trainer_state(global_step=0, epoch=0.0, log_history=None, main=True):
    return SimpleNamespace(global_step=global_step, epoch=epoch, log_history=log_history or [],
                           is_world_process_zero=main)


def hf_begin(cb, tmp_path, state=None, model=None):
    model = model or mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state or trainer_state(), None, model=model,
                      optimizer=opt)
    return model, opt


def one_update(model, opt):
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()


def test_hf_train_begin_without_a_model_or_an_optimizer_is_refused(tmp_path):
    cb = hf_callback()
    model = mlp()
    args = SimpleNamespace(output_dir=str(tmp_path))
    for given in ({"model": model}, {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}):
        with pytest.raises(TbdiagError, match="the Trainer passed no model or optimizer to on_train_begin"):
            cb.on_train_begin(args, trainer_state(), None, **given)
    assert cb.tb is None and cb.updates == 0


def test_hf_by_default_every_hundredth_update_rebalances(tmp_path):
    cb = hf_callback()
    hf_begin(cb, tmp_path)
    assert [n for n in range(1, 201) if cb.tb.step_update(n)] == [100, 200]


def test_hf_initial_multipliers_from_a_recommend_file_named_by_a_string(tmp_path):
    from tbdiag.allocation.recommend import SCHEMA

    path = tmp_path / "multipliers.json"
    path.write_text(json.dumps({"schema": SCHEMA, "layers": {"2.0": {"multiplier": 1.25}}}))
    cb = hf_callback(initial=str(path))
    hf_begin(cb, tmp_path)
    assert cb.tb.multipliers["2.0"] == 1.25 and cb.tb.n_balances == 0


def test_hf_every_optimizer_step_since_the_last_step_end_is_counted(tmp_path):
    cb = hf_callback(every=1, warmup=1)
    model, opt = hf_begin(cb, tmp_path)
    one_update(model, opt)
    one_update(model, opt)
    cb.on_step_end(None, trainer_state(2), None)
    assert (cb.updates, cb.tb.updates, cb.tb.n_balances) == (2, 2, 1)


def test_hf_a_second_train_call_keeps_the_balancer_and_counts_each_update_once(tmp_path):
    cb = hf_callback(every=1, warmup=1)
    model, opt = hf_begin(cb, tmp_path)
    tb = cb.tb
    cb.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), trainer_state(), None, model=model, optimizer=opt)
    one_update(model, opt)
    cb.on_step_end(None, trainer_state(1), None)
    assert cb.tb is tb and cb.updates == 1 and tb.updates == 1 and tb.n_balances == 1


def test_hf_resumes_from_the_state_saved_beside_the_checkpoint(tmp_path, caplog):
    saved = TempBalance(mlp(1), lambda g: torch.optim.SGD(g, lr=0.1), every=3, per="update")
    for _ in range(4):
        saved.step_update()
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "tbdiag_tempbalance.json").write_text(json.dumps(saved.state_dict()))
    cb = hf_callback(every=3)
    with caplog.at_level(logging.INFO, logger="tbdiag.integrations.hf"):
        model, opt = hf_begin(cb, tmp_path, trainer_state(4, 1.0))
    assert cb.tb.multipliers == saved.multipliers and (cb.tb.updates, cb.tb.n_balances) == (4, 2)
    assert cb.tb.last_balance_s == 0.0  # no refit at the resume: the saved multipliers apply
    assert [r.getMessage() for r in caplog.records] == ["TempBalance: resumed at update 4 with 3 units"]
    one_update(model, opt)
    cb.on_step_end(None, trainer_state(5), None)
    assert cb.updates == 5 and cb.tb.updates == 5


def test_hf_resuming_without_a_saved_state_warns_and_counts_on_from_the_trainer(tmp_path, caplog):
    cb = hf_callback(every=3, warmup=4)
    with caplog.at_level(logging.WARNING, logger="tbdiag.integrations.hf"):
        hf_begin(cb, tmp_path, trainer_state(4, 1.5))
    path = tmp_path / "checkpoint-4" / "tbdiag_tempbalance.json"
    assert [r.getMessage() for r in caplog.records] == [
        f"TempBalance: resuming at step 4 without {path} (a checkpoint outside output_dir?); counting on from the "
        "Trainer's step and rebalancing from the weights now"]
    assert (cb.updates, cb.tb.updates, cb.tb.epoch, cb.tb.n_balances) == (4, 4, 1, 1)  # past the warm-up: fitted


@pytest.mark.parametrize("options, balances", [
    ({"warmup": 5}, 0),  # still in the warm-up at update 4
    ({"warmup": 0}, 1),  # fitted when built, not again
    ({"warmup": 4, "every": 0}, 0),  # never rebalanced
    ({"warmup": 4, "initial": {"2.0": 2.0}}, 0),  # the multipliers given are kept
])
def test_hf_resuming_without_a_saved_state_fits_only_past_the_warmup_once_and_without_initial(tmp_path, options,
                                                                                             balances):
    cb = hf_callback(every=options.pop("every", 3), **options)
    hf_begin(cb, tmp_path, trainer_state(4, None))
    assert (cb.tb.updates, cb.tb.epoch, cb.tb.n_balances) == (4, 0, balances)


def test_hf_a_skipped_step_after_a_real_one_does_not_rebalance_again(tmp_path):
    cb = hf_callback(every=1, warmup=1)
    model, opt = hf_begin(cb, tmp_path)
    one_update(model, opt)
    cb.on_step_end(None, trainer_state(1), None)
    cb.on_step_end(None, trainer_state(1), None)  # the scaler skipped this one
    assert (cb.updates, cb.tb.updates, cb.tb.n_balances) == (1, 1, 1)


@pytest.mark.parametrize("epoch, whole", [(2.0, 2), (2.9999999999, 3), (0.5, 0)])
def test_hf_epoch_end_counts_whole_epochs(tmp_path, epoch, whole):
    cb = hf_callback(per="epoch", every=1, warmup=1)
    hf_begin(cb, tmp_path)
    cb.on_epoch_end(None, trainer_state(8, epoch), None)
    assert cb.tb.epoch == whole


def test_hf_a_log_row_before_any_update_shows_the_current_rates(tmp_path):
    cb = hf_callback(log="groups", initial={"2.0": 2.0})
    hf_begin(cb, tmp_path)
    logs, row = {"loss": 1.0}, {"loss": 1.0, "step": 0}
    cb.on_log(None, trainer_state(0, log_history=[row]), None, logs=logs)
    assert logs["lr/2.0"] == pytest.approx(0.2) and logs["tb/mult_max"] == 2.0
    assert row == logs | {"step": 0}


def test_hf_a_log_row_of_another_step_is_left_alone(tmp_path):
    cb = hf_callback()
    hf_begin(cb, tmp_path)
    logs, older = {"loss": 1.0}, {"loss": 2.0, "step": 3}
    cb.on_log(None, trainer_state(4, log_history=[older]), None, logs=logs)
    assert older == {"loss": 2.0, "step": 3} and logs["tb/n_units"] == 3.0


def test_hf_a_log_before_training_gets_nothing(tmp_path):
    cb = hf_callback()
    logs = {"loss": 1.0}
    cb.on_log(None, trainer_state(), None, logs=logs)
    assert logs == {"loss": 1.0}


def test_hf_the_state_is_saved_into_the_checkpoint_folder_by_the_main_process_only(tmp_path):
    cb = hf_callback(every=2)
    hf_begin(cb, tmp_path)
    args = SimpleNamespace(output_dir=str(tmp_path))
    (tmp_path / "checkpoint-2").mkdir()
    cb.on_save(args, trainer_state(2, main=False), None)
    assert not (tmp_path / "checkpoint-2" / "tbdiag_tempbalance.json").exists()
    cb.on_save(args, trainer_state(3), None)  # no such checkpoint folder: nothing written
    assert not (tmp_path / "checkpoint-3").exists()
    cb.on_save(args, trainer_state(2), None)
    saved = json.loads((tmp_path / "checkpoint-2" / "tbdiag_tempbalance.json").read_text())
    assert saved == json.loads(json.dumps(cb.tb.state_dict())) and saved["n_balances"] == 1


def test_hf_nothing_is_saved_before_training(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    hf_callback().on_save(SimpleNamespace(output_dir=str(tmp_path)), trainer_state(2), None)
    assert list((tmp_path / "checkpoint-2").iterdir()) == []


# --- integrations.lightning: the callback's hooks called as the Trainer calls them -------------------------------


def lightning_callback(**options):
    lightning = pytest.importorskip("tbdiag.integrations.lightning")
    return lightning.TempBalanceCallback(**options)


class LoggedMLP(nn.Sequential):
    """`mlp` as a LightningModule looks to the callback: ``log_dict`` records what it is given."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(*mlp(seed))
        self.logged: list[tuple[dict, dict]] = []

    def log_dict(self, values, **kwargs):
        self.logged.append((values, kwargs))


def fake_trainer(*optimizers, global_step=0, current_epoch=0, loggers=()):
    return SimpleNamespace(optimizers=list(optimizers), lr_scheduler_configs=[], global_step=global_step,
                           current_epoch=current_epoch, loggers=list(loggers))


def lightning_start(cb, **trainer_args):
    module = LoggedMLP()
    trainer = fake_trainer(torch.optim.SGD(module.parameters(), lr=0.1), **trainer_args)
    cb.on_fit_start(trainer, module)
    cb.on_train_start(trainer, module)
    return trainer, module


def test_lightning_schedulers_are_not_options_of_the_callback():
    with pytest.raises(TbdiagError, match=r"^TempBalanceCallback: schedulers come from configure_optimizers; do not "
                                          r"pass them$"):
        lightning_callback(schedulers=[])


def test_lightning_an_unknown_option_is_named_as_one_of_tempbalances():
    with pytest.raises(TbdiagError, match=r"^TempBalanceCallback: got an unexpected keyword argument 'every_epoch'; "
                                          r"the options are TempBalance's$"):
        lightning_callback(every_epoch=3)


@pytest.mark.parametrize("index", [True, "0", 1.0])
def test_lightning_an_optimizer_index_that_is_no_whole_number_is_refused(index):
    with pytest.raises(TbdiagError, match=rf"^TempBalanceCallback: optimizer={index!r}; give the index \(0, 1, …\) of "
                                          r"an optimizer that configure_optimizers returns$"):
        lightning_callback(optimizer=index)


def test_lightning_no_optimizer_to_balance_is_refused():
    with pytest.raises(TbdiagError, match=r"^TempBalanceCallback: configure_optimizers returned no optimizer$"):
        lightning_callback().on_fit_start(fake_trainer(), LoggedMLP())


def test_lightning_logs_the_coming_update_per_step_and_to_the_loggers():
    cb = lightning_callback(log="groups", initial={"2.0": 2.0})
    trainer, module = lightning_start(cb, loggers=["a logger"])
    cb.on_train_batch_start(trainer, module, None, 0)
    [(values, kwargs)] = module.logged
    assert values["lr/2.0"] == pytest.approx(0.2) and values["tb/mult_max"] == 2.0 and "opt0/lr/2.0" not in values
    assert kwargs == {"on_step": True, "on_epoch": False, "logger": True, "batch_size": 1}


def test_lightning_without_a_logger_the_values_go_to_the_progress_bar_only():
    cb = lightning_callback()
    trainer, module = lightning_start(cb)
    cb.on_train_batch_start(trainer, module, None, 0)
    assert module.logged[0][1]["logger"] is False and len(module.logged[0][0]) == 8


def test_lightning_log_none_logs_nothing():
    cb = lightning_callback(log=None)
    trainer, module = lightning_start(cb)
    cb.on_train_batch_start(trainer, module, None, 0)
    assert module.logged == []


def test_lightning_each_step_of_its_optimizer_is_one_update():
    cb = lightning_callback(per="update", every=2, warmup=1)
    trainer, module = lightning_start(cb)
    opt = trainer.optimizers[0]
    for _ in range(3):  # three steps in one batch (manual optimisation): three updates
        module(torch.randn(4, 16)).square().mean().backward()
        opt.step()
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 1)  # no step in this batch
    assert (cb.tempbalance.updates, cb.tempbalance.n_balances) == (3, 1)


def test_lightning_an_epoch_end_counts_the_epochs_done():
    cb = lightning_callback(every=2, warmup=1)
    trainer, module = lightning_start(cb, current_epoch=3)
    cb.on_train_epoch_end(trainer, module)
    assert (cb.tempbalance.epoch, cb.tempbalance.n_balances) == (4, 1)


def test_lightning_a_state_loaded_before_fit_is_kept_then_applied_without_a_refit():
    saved = TempBalance(mlp(1), lambda g: torch.optim.SGD(g, lr=0.1), every=2, per="update")
    saved.step_update(3)
    cb = lightning_callback(every=2, per="update")
    cb.load_state_dict(saved.state_dict())
    assert cb.state_dict() == saved.state_dict()  # a checkpoint written before fit starts keeps it
    lightning_start(cb, global_step=7)
    tb = cb.tempbalance
    assert tb.multipliers == saved.multipliers and (tb.updates, tb.n_balances) == (3, 1)  # not the Trainer's 7
    assert tb.last_balance_s == 0.0 and cb.state_dict() == tb.state_dict()


def test_lightning_a_state_loaded_after_setup_is_applied_and_kept():
    saved = TempBalance(mlp(1), lambda g: torch.optim.SGD(g, lr=0.1), every=2, per="update")
    saved.step_update(3)
    cb = lightning_callback(every=2, per="update")
    module = LoggedMLP()
    trainer = fake_trainer(torch.optim.SGD(module.parameters(), lr=0.1), global_step=7)
    cb.on_fit_start(trainer, module)
    cb.load_state_dict(saved.state_dict())  # strategies that restore after setup
    cb.on_train_start(trainer, module)
    assert cb.tempbalance.multipliers == saved.multipliers and cb.tempbalance.updates == 3


def test_lightning_an_empty_state_is_no_resume():
    cb = lightning_callback()
    cb.load_state_dict({})
    assert cb.state_dict() == {}
    lightning_start(cb)
    assert cb.tempbalance.n_balances == 1 and cb.state_dict()["n_balances"] == 1


def test_lightning_resumed_without_its_state_counts_on_from_the_trainer(caplog):
    cb = lightning_callback(every=2, per="update")
    with caplog.at_level(logging.INFO, logger="tbdiag.integrations.lightning"):
        lightning_start(cb, global_step=5, current_epoch=2)
    assert (cb.tempbalance.updates, cb.tempbalance.epoch) == (5, 2)
    assert [r.getMessage() for r in caplog.records] == ["TempBalance: resumed without its state; counting on from "
                                                        "update 5"]


def test_lightning_several_optimizers_without_a_step_count_count_from_zero_with_a_warning(caplog):
    gan = Gan()
    opt_g, opt_d = torch.optim.SGD(gan.gen.parameters(), lr=0.1), torch.optim.SGD(gan.disc.parameters(), lr=0.1)
    cb = lightning_callback(every=2, per="update", optimizer=1)
    trainer = fake_trainer(opt_g, opt_d, global_step=6, current_epoch=1)
    with caplog.at_level(logging.WARNING, logger="tbdiag.integrations.lightning"):
        cb.on_fit_start(trainer, gan)
        cb.on_train_start(trainer, gan)
    assert (cb.tempbalance.units, cb.tempbalance.updates, cb.tempbalance.epoch) == (["disc.1", "disc.2"], 0, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "TempBalance: resumed without its state and several optimizers; this optimizer keeps no step count, so its "
        "updates are counted from 0"]


def test_lightning_several_optimizers_count_on_from_their_own_step_count():
    gan = Gan()
    opt_g, opt_d = torch.optim.Adam(gan.gen.parameters(), lr=1e-3), torch.optim.Adam(gan.disc.parameters(), lr=1e-3)
    for _ in range(4):
        gan.disc(torch.randn(2, 32)).sum().backward()
        opt_d.step()
    cb = lightning_callback(every=2, per="update", optimizer=1)
    trainer = fake_trainer(opt_g, opt_d, global_step=9)
    cb.on_fit_start(trainer, gan)
    cb.on_train_start(trainer, gan)
    assert cb.tempbalance.updates == 4


def test_lightning_a_fresh_run_with_several_optimizers_reports_no_resume(caplog):
    gan = Gan()
    opt_g, opt_d = torch.optim.SGD(gan.gen.parameters(), lr=0.1), torch.optim.SGD(gan.disc.parameters(), lr=0.1)
    cb = lightning_callback(every=2, per="update")
    trainer = fake_trainer(opt_g, opt_d)
    with caplog.at_level(logging.INFO, logger="tbdiag.integrations.lightning"):
        cb.on_fit_start(trainer, gan)
        cb.on_train_start(trainer, gan)
    assert caplog.records == [] and cb.tempbalance.updates == 0


def test_every_scheduler_passed_is_taken_as_passed_not_only_the_first():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    tb = TempBalance(model, opt, schedulers=[warm, plateau], initial={"2.0": 2.0})
    assert tb.multipliers["2.0"] == 2.0


# --- guards, hf, lightning: more survivors ---------------------------------------------------------------------


def test_a_scheduler_over_the_optimizer_a_wrapper_holds_is_found_through_the_wrapper():
    """TempBalance given accelerate's wrapper looks through ``.optimizer``: a scheduler built over the inner one
    is found there (and only that one)."""
    from tbdiag.tempbalance.guards import built_over

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    found = built_over(SimpleNamespace(optimizer=opt))
    assert len(found) == 1 and found[0] is sched


def test_hf_train_begin_without_a_model_names_the_hook_in_full(tmp_path):
    cb = hf_callback()
    with pytest.raises(TbdiagError) as info:
        cb.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), trainer_state(), None, model=mlp())
    assert str(info.value) == "TempBalanceCallback: the Trainer passed no model or optimizer to on_train_begin"


def test_hf_without_a_scheduler_a_loaded_state_with_initial_lr_is_reported(tmp_path, caplog):
    cb = hf_callback()
    model = mlp()
    with caplog.at_level(logging.WARNING, logger="tbdiag.tempbalance.guards"):
        cb.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), trainer_state(), None, model=model,
                          optimizer=loaded_optimizer(model.parameters()), lr_scheduler=None)
    assert tempbalance_warnings(caplog) == [
        "TempBalance: the optimizer's groups carry initial_lr (a loaded state, or a scheduler built before); pass "
        "any scheduler built over them as schedulers=[...]"]


def test_hf_the_saved_state_is_json_indented_by_one_with_a_final_newline(tmp_path):
    cb = hf_callback(every=2)
    hf_begin(cb, tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    cb.on_save(SimpleNamespace(output_dir=str(tmp_path)), trainer_state(2), None)
    text = (tmp_path / "checkpoint-2" / "tbdiag_tempbalance.json").read_text(encoding="utf-8")
    assert text == json.dumps(cb.tb.state_dict(), indent=1) + "\n" and text.startswith('{\n "')


def test_lightning_the_old_log_rates_option_is_refused_with_its_replacement():
    with pytest.raises(TbdiagError) as info:
        lightning_callback(log_rates=True)
    assert str(info.value) == "TempBalanceCallback: log_rates is now log: log='summary' (default), 'groups' or None"


def test_lightning_a_scheduler_that_names_no_optimizer_is_taken_as_this_ones():
    """A custom scheduler without ``.optimizer`` (Lightning steps it through lr_scheduler_step) is adapted to the
    split groups: its per-group list gets one entry per split group."""
    cb = lightning_callback(initial={"2.0": 2.0})
    module = LoggedMLP()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    custom = SimpleNamespace(base_lrs=[0.1])
    trainer = fake_trainer(opt)
    trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=custom)]
    cb.on_fit_start(trainer, module)
    assert len(opt.param_groups) > 1 and custom.base_lrs == [0.1] * len(opt.param_groups)


def test_lightning_a_second_fit_after_a_resumed_one_starts_from_the_initial_multipliers():
    saved = TempBalance(mlp(1), lambda g: torch.optim.SGD(g, lr=0.1), every=2, per="update")
    saved.step_update(3)
    cb = lightning_callback(every=2, per="update", initial={"2.0": 2.0})
    cb.load_state_dict(saved.state_dict())
    lightning_start(cb, global_step=7)
    assert cb.tempbalance.multipliers == saved.multipliers  # the first fit resumed
    lightning_start(cb)  # trainer.fit again, on a new model: nothing pending any more
    tb = cb.tempbalance
    assert tb.multipliers["2.0"] == 2.0 and (tb.updates, tb.n_balances) == (0, 0)
