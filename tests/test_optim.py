"""TempBalance with optimizers and schedulers as people build them: any grouping, schedulers before or
after, checkpoints in the original layout, timm's lr_scale contract."""

import copy
import io

import pytest
import torch
from torch import nn

import tbdiag
from tbdiag import TempBalance
from tbdiag.errors import TbdiagError
from tests import tiny_models

SCHEDULES = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] * 10 for g in opt.param_groups],
                                                                 total_steps=8),
    "warmup+cosine": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
              torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)], milestones=[3]),
}


def adamw(model, lr_head=None):
    """AdamW over decay / no-decay groups (and, with ``lr_head``, the head at its own rate)."""
    groups = tbdiag.param_groups(model, weight_decay=0.1)
    if lr_head is not None:
        head = {id(p) for p in model.head.parameters()}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in head]
        groups.append({"params": list(model.head.parameters()), "lr": lr_head, "weight_decay": 0.0, "name": "head"})
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.95))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (4, 8), generator=g)


def train_steps(model, opt, sched, tb, n, recorder=None):
    idx = batch()
    for step in range(n):
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if tb is not None:
            tb.step_update(step + 1)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_stepped_lr_is_base_schedule_times_multiplier(schedule, when):
    """Record the lr every group steps with; it equals the schedule of its original group × its unit's multiplier."""
    model = tiny_models.mha_net()
    opt = adamw(model, lr_head=5e-3)
    reference = SCHEDULES[schedule](torch.optim.AdamW([{"params": [torch.zeros(1)], "lr": g["lr"]}
                                                        for g in opt.param_groups]))
    sched = SCHEDULES[schedule](opt) if when == "before" else None
    tb = TempBalance(model, opt, every=2, per="update", schedulers=[sched] if sched else ())
    sched = sched or SCHEDULES[schedule](opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    idx = batch()
    for step in range(6):
        base = [g["lr"] for g in reference.optimizer.param_groups]
        mult = tb.multipliers
        nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        reference.optimizer.step()
        reference.step()
        tb.step_update(step + 1)
        for g in opt.param_groups:
            src = 0 if ":" not in g["name"] else 1 if g["name"].endswith(":no_decay") else 2
            assert seen[-1][g["name"]] == pytest.approx(base[src] * mult[g["unit"]], rel=1e-12), (step, g["name"])
        assert [g["lr"] for g in opt.param_groups if ":" not in g["name"]][0] == pytest.approx(
            reference.optimizer.param_groups[0]["lr"])  # base rate between steps
    assert tb.n_balances == 4 and len(set(tb.multipliers.values())) > 3  # balanced at 0, 2, 4, 6


def test_existing_groups_keep_every_setting_and_get_readable_names():
    model = tiny_models.mha_net()
    opt = adamw(model, lr_head=5e-3)
    before = {id(p): {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups for p in g["params"]}
    tb = TempBalance(model, opt)
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in before[id(p)].items():
                if k != "name":
                    assert g[k] == v, (g["name"], k)
    names = [g["name"] for g in opt.param_groups]
    assert "blocks.1.mlp.0" in names and "blocks.1.mlp.0:no_decay" in names and "default:head" in names
    assert len(names) == len(set(names))
    sub = [g for g in opt.param_groups if g["unit"] == "blocks.1.mlp.0"]
    assert len(sub) == 2 and {g["lr_scale"] for g in sub} == {tb.multipliers["blocks.1.mlp.0"]}
    with pytest.raises(TbdiagError, match=r"^the optimizer's groups are already split by unit \(TempBalance applied twice\?\)$"):
        TempBalance(model, opt)


def test_timm_layer_decay_lr_scale_composes_without_double_scaling():
    """timm's param_groups_layer_decay puts lr_scale on groups and its schedulers set lr = value × lr_scale."""
    model = tiny_models.mha_net()
    groups = [{"params": list(model.blocks[i].parameters()), "lr_scale": 0.5 ** (2 - i)} for i in range(3)]
    groups.append({"params": [*model.tok_emb.parameters(), *model.ln_f.parameters(), *model.head.parameters()],
                   "lr_scale": 1.0})
    opt = torch.optim.AdamW(groups, lr=1e-3)
    tb = TempBalance(model, opt, apply_scale=False, unit="block")
    for g in opt.param_groups:  # what a timm scheduler does on every step
        g["lr"] = 1e-3 * g["lr_scale"]
    for g in opt.param_groups:
        layer_decay = 0.5 ** (2 - int(g["unit"].split(".")[1])) if g["unit"] != "default" else 1.0
        assert tb.effective_lrs()[g["name"]] == pytest.approx(1e-3 * layer_decay * tb.multipliers[g["unit"]])
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    model(batch()).sum().backward()
    opt.step()
    assert seen[0] == [g["lr"] for g in opt.param_groups]  # no second scaling by TempBalance's hooks


@pytest.mark.parametrize("schedule", ["warmup+cosine", "lambda"])
def test_checkpoint_in_original_layout_resumes_bit_identically(schedule):
    """The optimizer saves in its original two groups: a fresh optimizer loads it before or after TempBalance,
    and the resumed run equals the uninterrupted one."""
    def fresh():
        model = tiny_models.mha_net()
        opt = adamw(model)
        sched = SCHEDULES[schedule](opt)
        return model, opt, sched

    model, opt, sched = fresh()
    tb = TempBalance(model, opt, every=2, per="update", schedulers=[sched])
    train_steps(model, opt, sched, tb, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "tb": tb.state_dict()})
    assert len(saved["opt"]["param_groups"]) == 2
    buffer = io.BytesIO()
    torch.save(saved["sched"], buffer)
    buffer.seek(0)
    sched_state = torch.load(buffer, weights_only=True)  # plain data, in the original two groups
    children = sched_state.get("_schedulers", [sched_state])
    assert [len(c["base_lrs"]) for c in children] == [2] * len(children) and len(sched_state["_last_lr"]) == 2
    train_steps(model, opt, sched, None, 3)
    for order in ("load, then split", "split, then load"):
        m2, o2, s2 = fresh()
        m2.load_state_dict(saved["model"])
        if order == "load, then split":
            o2.load_state_dict(copy.deepcopy(saved["opt"]))  # torch shares the tensors
            s2.load_state_dict(saved["sched"])
            tb2 = TempBalance(m2, o2, every=2, per="update", schedulers=[s2], initial={})
        else:
            tb2 = TempBalance(m2, o2, every=2, per="update", schedulers=[s2], initial={})
            o2.load_state_dict(copy.deepcopy(saved["opt"]))  # torch shares the tensors
            s2.load_state_dict(saved["sched"])
            tb2.adopt_scheduler(s2)
        tb2.load_state_dict(saved["tb"])
        assert tb2.multipliers == saved["tb"]["multipliers"]
        train_steps(m2, o2, s2, None, 3)
        for p, q in zip(model.parameters(), m2.parameters()):
            assert torch.equal(p, q), order


def test_factory_route_keeps_biases_and_norms_out_of_weight_decay():
    model = tiny_models.mha_net()
    tb = TempBalance(model, lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1))
    wd = {id(p): g["weight_decay"] for g in tb.optimizer.param_groups for p in g["params"]}
    assert wd[id(model.blocks[0].ln_1.weight)] == 0 and wd[id(model.blocks[0].mlp[0].bias)] == 0
    assert wd[id(model.tok_emb.weight)] == 0 and wd[id(model.blocks[0].mlp[0].weight)] == 0.1
    ref = TempBalance(tiny_models.mha_net(), lambda g: torch.optim.SGD(g, lr=0.1, weight_decay=5e-4), no_decay=False)
    assert {g["weight_decay"] for g in ref.optimizer.param_groups} == {5e-4}  # the paper's setup: decay on all
    groups = tbdiag.param_groups(model, weight_decay=0.1, no_decay=["*.mlp.2.weight"], decay_embeddings=True)
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.tok_emb.weight) in decayed and id(model.blocks[0].mlp[2].weight) not in decayed
    assert groups[0]["weight_decay"] == 0.1 and groups[1] == {"name": "no_decay", "params": groups[1]["params"],
                                                              "weight_decay": 0.0}
    groups = tbdiag.param_groups(model, no_decay=["tok_emb.*"], decay_embeddings=True)  # a pattern still wins
    assert id(model.tok_emb.weight) not in {id(p) for p in groups[0]["params"]} and "weight_decay" not in groups[0]


def test_param_groups_skip_frozen_parameters_and_empty_groups():
    model = tiny_models.mha_net()
    model.tok_emb.weight.requires_grad_(False)  # frozen, and the first parameter
    model.head.bias.requires_grad_(False)
    groups = tbdiag.param_groups(model, weight_decay=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - 2
    norms_only = tbdiag.param_groups(nn.LayerNorm(8), weight_decay=0.1)
    assert [g["name"] for g in norms_only] == ["no_decay"]  # no empty decay group


def test_unnamed_groups_get_readable_tags_and_wrappers_are_looked_through():
    """A group without a name but with weight decay 0 beside decayed ones is tagged no_decay, others g<i>;
    accelerate-style wrappers (``.optimizer``) are unwrapped, anything else is refused."""
    from types import SimpleNamespace

    from tbdiag.tempbalance.optim import inner_optimizer

    model = tiny_models.mha_net()
    head = {id(p) for p in model.head.parameters()}
    named = tbdiag.param_groups(model, weight_decay=0.1)
    plain = [{"params": [p for p in g["params"] if id(p) not in head], "weight_decay": g["weight_decay"]} for g in named]
    plain.append({"params": list(model.head.parameters()), "weight_decay": 0.1, "lr": 0.5})
    opt = torch.optim.AdamW(plain, lr=1e-3)
    tb = TempBalance(model, SimpleNamespace(optimizer=opt), initial={})
    assert tb.optimizer is opt
    tags = {g["name"].split(":")[1] for g in opt.param_groups if ":" in g["name"]}
    assert tags == {"no_decay", "g2"}
    with pytest.raises(TbdiagError, match="the optimizer is a SimpleNamespace, not a torch.optim.Optimizer, and wraps none"):
        inner_optimizer(SimpleNamespace(optimizer=SimpleNamespace()))


def three_groups_last_empty(model):
    """decay, no-decay, and a group that holds no parameters (yet), each with its own LambdaLR lambda."""
    groups = tbdiag.param_groups(model, weight_decay=0.1)
    groups.append({"params": [], "lr": 0.5, "name": "extra"})
    opt = torch.optim.AdamW(groups, lr=1e-3)
    lambdas = [lambda s: 0.9 ** s, lambda s: 1.0 / (1 + s), lambda s: 2.0]
    return opt, lambdas


@pytest.mark.parametrize("nested", [False, True])
def test_a_trailing_empty_group_keeps_every_group_on_its_own_schedule(nested):
    model = tiny_models.mha_net()
    opt, lambdas = three_groups_last_empty(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    if nested:
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt, [sched, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=1)], milestones=[9])
    tb = TempBalance(model, opt, schedulers=[sched])
    origin = ["no_decay" not in g["name"] for g in tb.optimizer.param_groups]  # True: from the decay group
    assert len(origin) > 3
    for step in range(1, 4):
        opt.step()
        sched.step()
        for g, decay in zip(tb.optimizer.param_groups, origin):
            assert g["lr"] == pytest.approx(1e-3 * lambdas[0 if decay else 1](step)), (g["name"], step)
    saved = opt.state_dict()
    assert [g.get("name") for g in saved["param_groups"]] == ["decay", "no_decay", "extra"]
    extra = saved["param_groups"][2]  # as it was when split: 0.5 × its lambda at step 0
    assert (extra["lr"], extra["initial_lr"], extra["params"]) == (1.0, 0.5, [])
    state = sched.state_dict()["_schedulers"][0] if nested else sched.state_dict()
    assert state["base_lrs"] == [1e-3, 1e-3, 0.5]  # the empty group keeps its own rate, not a neighbour's
    assert state["_last_lr"][2] == 1.0


def test_wrapped_schedulers_are_adopted_through_their_wrapper_and_report_split_rates():
    """accelerate's AcceleratedScheduler keeps the real one under ``.scheduler``; `get_last_lr` works at once."""
    model = tiny_models.mha_net()
    opt = adamw(model)
    inner = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 1.0])
    tb = TempBalance(model, opt, schedulers=[SimpleWrapper(SimpleWrapper(inner))])
    n = len(tb.optimizer.param_groups)
    assert n > 2 and len(inner.base_lrs) == len(inner.lr_lambdas) == n
    assert inner.get_last_lr() == [g["lr"] for g in tb.optimizer.param_groups]
    opt.step()
    inner.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3 * (0.5 if "no_decay" not in g["name"] else 1.0))
                                                   for g in opt.param_groups]


class SimpleWrapper:
    def __init__(self, scheduler):
        self.scheduler = scheduler


def test_timm_checkpoints_record_the_rate_without_tempbalance():
    """With timm's contract (its scheduler writes lr × lr_scale) the saved groups hold what timm would have
    written without TempBalance: the multiplier divided out, the layer decay kept."""
    model = tiny_models.mha_net()
    groups = [{"params": list(model.blocks[i].parameters()), "lr_scale": 0.5 ** (2 - i)} for i in range(3)]
    groups.append({"params": [*model.tok_emb.parameters(), *model.ln_f.parameters(), *model.head.parameters()]})
    opt = torch.optim.AdamW(groups, lr=1e-3)
    tb = TempBalance(model, opt, apply_scale=False, unit="block", initial={"blocks.0": 0.6, "blocks.1": 1.4})
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    saved = opt.state_dict()["param_groups"]
    assert [g["lr"] for g in saved] == pytest.approx([1e-3 * 0.25, 1e-3 * 0.5, 1e-3, 1e-3])
    assert [g.get("lr_scale") for g in saved] == [0.25, 0.5, 1.0, None]
    assert tb.multipliers["blocks.0"] == 0.6


def test_optimizer_state_with_another_number_of_groups_is_refused_as_torch_refuses_it():
    model = tiny_models.mha_net()
    opt = adamw(model)
    TempBalance(model, opt, initial={})
    other = torch.optim.AdamW([{"params": [p]} for p in list(model.parameters())[:3]], lr=1e-3).state_dict()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(other)


def test_step_hooks_scale_rate_and_decay_for_the_step_only():
    """`scale_rates` / `restore_rates` on groups as TempBalance leaves them and as other code may write them."""
    from types import SimpleNamespace

    from tbdiag.tempbalance.optim import restore_rates, scale_rates

    groups = [{"lr": 0.1, "lr_scale": 2.0, "weight_decay": 0.01, "wd_scale": 3.0},  # both scaled
              {"lr": 0.1, "weight_decay": 0.01},  # neither key: factors 1
              {"lr": 0.1, "lr_scale": 2.0, "tb_scale_lr": False, "weight_decay": 0.01, "wd_scale": 1.0},  # timm scales lr
              {"lr": 0.1, "lr_scale": 0.5, "wd_scale": 3.0}]  # no weight decay to scale
    before = copy.deepcopy(groups)
    opt = SimpleNamespace(param_groups=groups)
    scale_rates(opt, (), {})
    assert [(g["lr"], g.get("weight_decay")) for g in groups] == [
        (pytest.approx(0.2), pytest.approx(0.03)), (0.1, 0.01), (0.1, 0.01), (0.05, None)]
    restore_rates(opt, (), {})
    assert groups == before


def test_adopting_a_scheduler_directly_and_its_saved_state():
    """`adopt_scheduler` with the original group count taken from ``origin``; the saved state holds no
    tbdiag internals, and loading it into the adopted scheduler expands it again without a second adoption."""
    from tbdiag.tempbalance.optim import adopt_scheduler, split_by_unit

    model = tiny_models.mha_net()
    opt = adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 1.0])
    units = {id(p): name.split(".")[1] if name.startswith("blocks") else "default" for name, p in model.named_parameters()}
    opt.param_groups, origin = split_by_unit(opt.param_groups, units)
    adopt_scheduler(sched, opt, origin)
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups) > 2
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3 * (0.5 if o == 0 else 1.0)) for o in origin]
    state = sched.state_dict()
    assert not {"_tbdiag_layout", "state_dict", "load_state_dict"} & set(state) and len(state["base_lrs"]) == 2
    sched.load_state_dict(state)
    assert len(sched.base_lrs) == len(opt.param_groups) and sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_split_by_unit_names_every_group_once_and_sets_its_scales():
    from tbdiag.tempbalance.optim import split_by_unit

    a, b, c, d = (nn.Parameter(torch.zeros(2)) for _ in range(4))
    groups = [{"params": [a, d], "name": "first", "lr_scale": 0.5}, {"params": [b], "name": "same", "weight_decay": 0.0},
              {"params": [c], "name": "same"}]
    new, origin = split_by_unit(groups, {id(a): "u", id(b): "u", id(c): "u"})
    assert [g["name"] for g in new] == ["u", "default", "u:same", "u:same.2"] and origin == [0, 0, 1, 2]
    assert [(g["unit"], g["lr_scale"], g["tb_base_scale"], g["wd_scale"]) for g in new] == [
        ("u", 0.5, 0.5, 1.0), ("default", 0.5, 0.5, 1.0), ("u", 1.0, 1.0, 1.0), ("u", 1.0, 1.0, 1.0)]
    assert new[2]["weight_decay"] == 0.0 and [g["params"] for g in new] == [[a], [d], [b], [c]]
    no_decay_anywhere = [{"params": [a], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0}]
    assert [g["name"] for g in split_by_unit(no_decay_anywhere, {})[0]] == ["default", "default:g1"]


# --- what a hostile review found (each was silent or a traceback) -----------------------------------------------


def mlp(n_hidden: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), *[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(n_hidden)],
                         nn.Linear(64, 4))


class Holder(nn.Module):  # a task wrapper with `self.module = net`, or a compiled submodule
    def __init__(self, compiled: bool) -> None:
        super().__init__()
        if compiled:
            self.backbone = torch.compile(mlp())
        else:
            self.module = mlp()


@pytest.mark.parametrize("compiled", [False, True])
def test_layers_under_a_child_called_module_or_compiled_are_tuned(compiled):
    model = Holder(compiled)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prefix = "backbone." if compiled else ""
    tb = TempBalance(model, opt, initial={f"{prefix}{u}": m for u, m in (("1.0", 0.5), ("2.0", 2.0), ("3.0", 1.5))})
    units = {g["unit"]: len(g["params"]) for g in opt.param_groups}
    assert units == {"default": 4, f"{prefix}1.0": 2, f"{prefix}2.0": 2, f"{prefix}3.0": 2}
    assert tb.effective_lrs() == pytest.approx({"default": 0.1, f"{prefix}1.0": 0.05, f"{prefix}2.0": 0.2,
                                                f"{prefix}3.0": 0.15}, rel=1e-12)
    fitted = TempBalance(Holder(compiled), lambda g: torch.optim.SGD(g, lr=0.1))  # fitted through the wrapper
    assert sorted(fitted.values) == [f"{prefix}{u}" for u in ("1.0", "2.0", "3.0")]
    tuned = sorted(m for u, m in fitted.multipliers.items() if u != "default")
    assert tuned[0] == 0.5 and tuned[2] == 1.5 and 0.5 < tuned[1] < 1.5  # the linear map over three fits


def test_groups_added_later_are_split_tagged_and_saved():
    """Progressive unfreezing: add_param_group after TempBalance splits the new group by unit as well."""
    def parts(model):
        later = list(model[2].parameters()) + list(model[1].parameters())
        return [p for p in model.parameters() if all(p is not q for q in later)], later

    model = mlp()
    first, later = parts(model)
    opt = torch.optim.AdamW(first, lr=1e-3)
    tb = TempBalance(model, opt, initial={"1.0": 0.5, "2.0": 2.0})
    opt.add_param_group({"params": later, "lr": 1e-4, "name": "unfrozen"})
    added = {g["name"]: (g["unit"], g["lr_scale"]) for g in opt.param_groups if g["name"].endswith(":unfrozen")}
    assert added == {"2.0:unfrozen": ("2.0", 2.0), "1.0:unfrozen": ("1.0", 0.5)}
    saved = opt.state_dict()
    assert [len(g["params"]) for g in saved["param_groups"]] == [6, 4] and saved["param_groups"][1]["lr"] == 1e-4
    assert saved["param_groups"][1]["name"] == "unfrozen" and tb.effective_lrs()["2.0:unfrozen"] == pytest.approx(2e-4)
    fresh = mlp()
    first, later = parts(fresh)
    plain = torch.optim.AdamW(first, lr=1e-3)
    plain.add_param_group({"params": later, "lr": 1e-4})
    plain.load_state_dict(saved)  # a run without TempBalance loads it


def test_a_step_that_raises_does_not_leave_rates_scaled():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tb = TempBalance(model, opt, initial={"1.0": 2.0, "2.0": 1.0, "3.0": 1.0})

    def bad_closure():
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        opt.step(bad_closure)
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.1  # saved as the scheduler's rate
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append({g["name"]: g["lr"] for g in o.param_groups}))
    opt.step()
    assert seen[0]["1.0"] == pytest.approx(0.2) and tb.effective_lrs()["1.0"] == pytest.approx(0.2)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["1.0"] == 0.1


def test_tied_embeddings_stay_out_of_weight_decay():
    gpt2 = tiny_models.gpt2()  # lm_head.weight is transformer.wte.weight
    groups = tbdiag.param_groups(gpt2, weight_decay=0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(gpt2.transformer.wte.weight) in no_decay and id(gpt2.lm_head.weight) in no_decay


def test_what_tempbalance_cannot_do_is_refused_before_anything_changes():
    with pytest.raises(TbdiagError, match="no layer to tune in this Sequential"):
        TempBalance(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), lambda g: torch.optim.SGD(g, lr=0.1))
    model = mlp()
    with pytest.raises(TbdiagError, match="LBFGS keeps a single param group"):
        TempBalance(model, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TbdiagError, match="the optimizer holds none of this model's parameters"):
        TempBalance(model, torch.optim.SGD(mlp().parameters(), lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TbdiagError, match="multipliers for l1: no such tuned unit"):
        TempBalance(model, opt, initial={"l1": 2.0})
    assert len(opt.param_groups) == 1 and "unit" not in opt.param_groups[0]  # untouched: a retry works
    tb = TempBalance(model, opt, initial={})
    before = tb.state_dict()
    with pytest.raises(TbdiagError, match="multipliers for l1: no such tuned unit"):
        tb.load_state_dict({**before, "updates": 99, "multipliers": {"l1": 2.0}})
    assert tb.state_dict() == before


def test_frozen_tuned_layers_round_trip_and_multipliers_reload():
    model = mlp()
    model[1][0].requires_grad_(False)  # tuned, but frozen: no group holds it
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tb = TempBalance(model, opt)
    state = tb.state_dict()
    assert "1.0" in state["multipliers"] and "1.0" not in {g["unit"] for g in opt.param_groups}
    assert state["multipliers"]["1.0"] in (0.5, 1.5) or 0.5 < state["multipliers"]["1.0"] < 1.5
    again = mlp()
    again[1][0].requires_grad_(False)
    other = TempBalance(again, torch.optim.SGD([p for p in again.parameters() if p.requires_grad], lr=0.1), initial={})
    assert set(other.multipliers.values()) == {1.0}
    other.load_state_dict(state)
    assert other.multipliers == state["multipliers"] and other.values == state["values"]
    other.set_multipliers(other.multipliers)  # `default` (1) included
    assert other.effective_lrs() == pytest.approx({g["name"]: 0.1 * state["multipliers"][g["unit"]]
                                                   for g in other.optimizer.param_groups}, rel=1e-12)


def test_cyclic_lr_momentum_and_param_names_follow_the_split():
    model = mlp()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=True)
    TempBalance(model, opt, schedulers=[sched], initial={})
    assert len(sched.base_momentums) == len(sched.max_momentums) == len(opt.param_groups)
    opt.step()
    sched.step()
    names = {n for n, _ in model.named_parameters()}
    for g in opt.param_groups:
        assert len(g["param_names"]) == len(g["params"]) and set(g["param_names"]) <= names


def test_adopting_a_scheduler_when_the_layout_cannot_tell():
    class TimmLike:  # timm's Scheduler keeps base_values, no base_lrs
        def __init__(self, opt):
            self.optimizer = opt
            self.base_values = [g["lr"] for g in opt.param_groups]

        def state_dict(self):
            return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

        def load_state_dict(self, state):
            self.__dict__.update(state)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timm = TimmLike(opt)
    with pytest.raises(TbdiagError, match=r"scheduler \(TimmLike\) was built over this SGD before TempBalance"):
        TempBalance(model, opt, apply_scale=False, initial={})
    TempBalance(model, opt, apply_scale=False, initial={}, schedulers=[timm])
    assert len(timm.base_values) == len(opt.param_groups) and timm.state_dict()["base_values"] == [0.1]
    one = mlp(n_hidden=1)  # one group holding two units and an empty one: split, still two groups
    opt2 = torch.optim.SGD([{"params": list(one.parameters())}, {"params": [], "lr": 0.5}], lr=0.1)
    tb2 = TempBalance(one, opt2, initial={})
    timm2 = TimmLike(opt2)
    assert len(opt2.param_groups) == 2 and tb2._layout.origin == [0, 0]
    with pytest.raises(TbdiagError, match="cannot tell whether this scheduler was built before"):
        tb2.adopt_scheduler(timm2)
    assert timm2.base_values == [0.1, 0.1]


def test_a_checkpoint_taken_after_a_raising_step_holds_the_unscaled_rate_and_decay():
    model = mlp()
    first = list(model[1].parameters())  # the first sub-group is a tuned unit's, its multiplier 2
    opt = torch.optim.SGD([{"params": first + [p for p in model.parameters() if all(p is not q for q in first)],
                            "weight_decay": 0.01}], lr=0.1)
    TempBalance(model, opt, target="both", initial={"1.0": 2.0, "2.0": 1.0, "3.0": 1.0})
    assert opt.param_groups[0]["unit"] == "1.0"

    def bad_closure():
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError):
        opt.step(bad_closure)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (pytest.approx(0.2), pytest.approx(0.02))
    saved = opt.state_dict()["param_groups"][0]
    assert (saved["lr"], saved["weight_decay"]) == (0.1, 0.01) and not {"base_lr_", "base_wd_"} & set(saved)


def test_param_names_are_saved_per_original_group_and_restored_per_split_group():
    model = mlp()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    TempBalance(model, opt, initial={})
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    opt.load_state_dict(saved)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        assert g["param_names"] == [names[id(p)] for p in g["params"]], g["name"]
