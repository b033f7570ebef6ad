"""TempBalance as a Lightning callback: the rate every group steps with, exact resume from a Lightning
checkpoint, updates counted under gradient accumulation, epochs, a recommend file, the runnable example."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tbdiag
from tbdiag.errors import TbdiagError
from tests import tiny_models

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.strategies import SingleDeviceStrategy  # noqa: E402

from tbdiag.integrations.lightning import TempBalanceCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec", "ignore:Be aware that when using `ckpt_path`")

ROOT = Path(__file__).resolve().parents[1]
BASE_LR = {"decay": 1e-3, "no_decay": 2e-3}  # the two original groups (no_decay at its own rate)
BATCHES = 3  # per epoch


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 8)  # every step of these short runs at its own rate


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and on a shared 2-core machine many times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class LitMHA(L.LightningModule):
    """tiny_models.mha_net as a next-token model; AdamW over decay/no-decay groups, per-step LambdaLR warm-up."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_models.mha_net()

    def training_step(self, batch, batch_idx):
        idx = batch[0]
        return nn.functional.cross_entropy(self.net(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())

    def configure_optimizers(self):
        groups = tbdiag.param_groups(self, weight_decay=0.1)
        for g in groups:
            g["lr"] = BASE_LR[g["name"]]
        opt = torch.optim.AdamW(groups, betas=(0.8, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(batches: int = BATCHES):
    data = torch.randint(0, 96, (4 * batches, 9), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)


class Recorder(L.Callback):
    """After TempBalanceCallback: a step pre-hook registered after TempBalance's records the rate each group
    steps with and the multipliers then; each batch end records (updates, rebalances so far)."""

    def __init__(self, tb_callback: TempBalanceCallback) -> None:
        self.tbc, self.steps, self.batch_ends, self.epoch_ends, self.at_start = tb_callback, [], [], [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after TempBalanceCallback logged
        tb = self.tbc.tempbalance
        self.at_start[trainer.global_step] = (dict(tb.values), tb.n_balances, tb.last_balance_s)

    def on_fit_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_pre_hook(self.pre_step)

    def pre_step(self, opt, args, kwargs):
        self.steps.append(({g["name"]: (g["lr"], g["unit"]) for g in opt.param_groups},
                           self.tbc.tempbalance.multipliers))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_ends.append((trainer.global_step, self.tbc.tempbalance.n_balances))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_ends.append(self.tbc.tempbalance.n_balances)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})


def fit(tmp_path, callback, *, epochs=2, batches=BATCHES, ckpt_path=None, model=None, **trainer_args):
    """Fit LitMHA on CPU with the callback and a Recorder; returns (model, trainer, recorder)."""
    recorder = Recorder(callback)
    model = model or LitMHA()
    args = {"logger": False, "enable_checkpointing": False, **trainer_args}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=[callback, recorder, *args.pop("callbacks", [])], **args)
    trainer.fit(model, loader(batches), ckpt_path=ckpt_path)
    return model, trainer, recorder


def check_stepped_rates(recorder, first_step=0):
    """Every group stepped at its original group's base rate × warm-up(step) × its unit's multiplier."""
    assert recorder.steps
    for k, (lrs, mult) in enumerate(recorder.steps, start=first_step):
        for name, (lr, unit) in lrs.items():
            base = BASE_LR["no_decay" if name.endswith(":no_decay") else "decay"]
            assert lr == pytest.approx(base * warmup(k) * mult[unit], rel=1e-12), (k, name)


def test_each_group_steps_at_base_schedule_times_multiplier_and_the_log_shows_it(tmp_path):
    """per="update", every=2: the recorded rate is base × multiplier at every step; the callback logs that
    effective rate, LearningRateMonitor the base rate of the same split group, at the same step."""
    cb = TempBalanceCallback(per="update", every=2, log="groups")
    mem = MemoryLogger()
    _, trainer, rec = fit(tmp_path, cb, logger=mem, log_every_n_steps=1,
                          callbacks=[L.callbacks.LearningRateMonitor(logging_interval="step")])
    check_stepped_rates(rec)
    tb = cb.tempbalance
    assert len(rec.steps) == 2 * BATCHES == trainer.global_step == tb.updates
    assert tb.n_balances == 4  # at fit start, after updates 2, 4, 6
    assert len({m for _, mult in rec.steps for m in mult.values()}) > 10  # multipliers really differ
    assert len(trainer.optimizers[0].param_groups) == 2 * len(tb.units) + 2  # split: unit × {decay, no_decay}
    for step, (lrs, mult) in enumerate(rec.steps):
        row = mem.rows[step]
        for name, (lr, unit) in lrs.items():
            assert row[f"lr/{name}"] == pytest.approx(lr, rel=1e-6), (step, name)  # effective, as stepped
            assert row[f"lr-AdamW/{name}"] * mult[unit] == pytest.approx(lr, rel=1e-6), (step, name)  # base
        values = rec.at_start[step][0]
        assert {k: v for k, v in row.items() if k.startswith("alpha/")} == pytest.approx(
            {f"alpha/{t.unit}": values[t.name] for t in tb.layers}, rel=1e-6)  # one layer per unit
        assert set(ours(row)) == SUMMARY | {f"lr/{n}" for n in lrs} | {f"alpha/{u}" for u in tb.units}


SUMMARY = {"tb/mult_min", "tb/mult_max", "tb/alpha_mean", "tb/alpha_std", "tb/rebalance_s", "tb/n_balances",
           "tb/n_units", "tb/n_failed"}


def ours(row):
    return {k: v for k, v in row.items() if k.startswith(("tb/", "lr/", "alpha/", "wd/"))}


def test_default_log_is_a_compact_summary_of_the_coming_update(tmp_path):
    cb = TempBalanceCallback(per="update", every=2, map="sqrt")  # multipliers of mean 1: their range moves
    mem = MemoryLogger()
    _, _, rec = fit(tmp_path, cb, logger=mem, log_every_n_steps=1)
    tb = cb.tempbalance
    assert sorted(mem.rows) == list(range(6))
    for step, (_, mult) in enumerate(rec.steps):
        values, n_balances, seconds = rec.at_start[step]
        alphas = [values[t.name] for t in tb.layers]
        mean = sum(alphas) / len(alphas)
        assert ours(mem.rows[step]) == pytest.approx({
            "tb/mult_min": min(mult[u] for u in tb.units), "tb/mult_max": max(mult[u] for u in tb.units),
            "tb/alpha_mean": mean, "tb/alpha_std": math.sqrt(sum((a - mean) ** 2 for a in alphas) / len(alphas)),
            "tb/rebalance_s": seconds, "tb/n_balances": n_balances, "tb/n_units": 12, "tb/n_failed": 0}, rel=1e-6)
    assert [rec.at_start[s][1] for s in range(6)] == [1, 1, 2, 2, 3, 3]
    assert mem.rows[1]["tb/mult_max"] != mem.rows[2]["tb/mult_max"]
    with pytest.raises(TbdiagError, match=r"TempBalanceCallback: log='group'; use one of 'summary', 'groups'"):
        TempBalanceCallback(log="group")
    quiet = MemoryLogger()
    fit(tmp_path, TempBalanceCallback(per="update", every=2, log=None), logger=quiet, log_every_n_steps=1, epochs=1,
        callbacks=[L.callbacks.LearningRateMonitor(logging_interval="step")])
    assert len(quiet.rows) == BATCHES and not any(ours(row) for row in quiet.rows.values())


class LitGAN(L.LightningModule):
    """Manual optimisation with two optimizers: the generator steps every batch (with a warm-up LambdaLR),
    the discriminator every other batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32))
        self.disc = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        real = batch[0]
        fake = self.gen(torch.randn(real.shape[0], 16))
        opt_g.zero_grad()
        self.manual_backward(nn.functional.softplus(-self.disc(fake)).mean())
        opt_g.step()
        self.lr_schedulers().step()
        if batch_idx % 2 == 0:
            opt_d.zero_grad()
            loss = nn.functional.softplus(-self.disc(real)).mean() + nn.functional.softplus(self.disc(fake.detach())).mean()
            self.manual_backward(loss)
            opt_d.step()

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.gen.parameters(), lr=1e-3)
        opt_d = torch.optim.Adam(self.disc.parameters(), lr=2e-3)
        return [opt_g, opt_d], [torch.optim.lr_scheduler.LambdaLR(opt_g, warmup)]


def fit_gan(tmp_path, callbacks, epochs=2, ckpt_path=None, logger=False):
    seen = {0: [], 1: []}

    class Hooks(L.Callback):  # the rate each group of each optimizer steps with, and the multipliers then
        def on_fit_start(self, trainer, pl_module):
            for i, (opt, cb) in enumerate(zip(trainer.optimizers, callbacks)):
                opt.register_step_pre_hook(lambda o, a, k, i=i, cb=cb: seen[i].append(
                    ({g["name"]: (g["lr"], g["unit"]) for g in o.param_groups}, cb.tempbalance.multipliers)))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, callbacks=[*callbacks, Hooks()])
    data = torch.utils.data.TensorDataset(torch.randn(12, 32, generator=torch.Generator().manual_seed(0)))
    trainer.fit(LitGAN(), torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer, seen


def test_two_optimizers_each_callback_balances_only_its_own_layers(tmp_path):
    """A GAN: one callback per optimizer; each tunes and fits only the layers its optimizer holds, counts only its
    optimizer's steps, logs under its own prefix and keeps its own state in the checkpoint."""
    cb_g, cb_d = TempBalanceCallback(per="update", every=2), TempBalanceCallback(per="update", every=2, optimizer=1)
    mem = MemoryLogger()
    trainer, seen = fit_gan(tmp_path, [cb_g, cb_d], logger=mem)
    g, d = cb_g.tempbalance, cb_d.tempbalance
    assert (g.units, sorted(g.values), d.units, sorted(d.values)) == (
        ["gen.1", "gen.2"], ["gen.1", "gen.2"], ["disc.1", "disc.2"], ["disc.1", "disc.2"])
    assert trainer.global_step == 10 and (len(seen[0]), len(seen[1])) == (6, 4)  # every step of both optimizers
    assert (g.updates, g.n_balances, d.updates, d.n_balances) == (6, 4, 4, 3)  # start, then 2, 4, 6 / 2, 4
    for k, (lrs, mult) in enumerate(seen[0]):
        for name, (lr, unit) in lrs.items():
            assert lr == pytest.approx(1e-3 * warmup(k) * mult[unit], rel=1e-12), (k, name)
    for lrs, mult in seen[1]:
        assert {name: lr for name, (lr, _) in lrs.items()} == pytest.approx(
            {name: 2e-3 * mult[unit] for name, (_, unit) in lrs.items()}, rel=1e-12)
    assert sorted(m for u, m in seen[0][-1][1].items() if u != "default") == [0.5, 1.5]
    logged = {k for row in mem.rows.values() for k in row} - {"epoch"}
    assert logged == {f"opt{i}/{k}" for i in (0, 1) for k in SUMMARY}
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert (states["TempBalanceCallback"]["updates"], states["TempBalanceCallback{'optimizer': 1}"]["updates"]) == (6, 4)
    again_g, again_d = TempBalanceCallback(per="update", every=2), TempBalanceCallback(per="update", every=2, optimizer=1)
    _, seen = fit_gan(tmp_path, [again_g, again_d], epochs=3, ckpt_path=path)
    assert (again_g.tempbalance.updates, again_d.tempbalance.updates) == (9, 6)
    assert seen[0][0][1] == g.multipliers and seen[1][0][1] == d.multipliers  # resumed with each one's own
    plain, _ = fit_gan(tmp_path, [])  # a checkpoint without TempBalance: each counts on from its Adam's step
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    late_g, late_d = TempBalanceCallback(per="update", every=4), TempBalanceCallback(per="update", every=4, optimizer=1)
    fit_gan(tmp_path, [late_g, late_d], epochs=3, ckpt_path=tmp_path / "plain.ckpt")
    assert [(cb.tempbalance.updates, cb.tempbalance.n_balances) for cb in (late_g, late_d)] == [(9, 2), (6, 1)]
    with pytest.raises(TbdiagError, match=r"optimizer=2, but configure_optimizers returned 2 optimizer\(s\); give an "
                                          r"index below 2"):
        fit_gan(tmp_path, [TempBalanceCallback(optimizer=2)])
    with pytest.raises(TbdiagError, match=r"optimizer=-1; give the index \(0, 1, …\) of an optimizer"):
        TempBalanceCallback(optimizer=-1)
    with pytest.raises(TbdiagError, match="others come from configure_optimizers"):
        TempBalanceCallback(others=[])
    with pytest.raises(TbdiagError, match="log_rates is now log: log='summary' \\(default\\), 'groups' or None"):
        TempBalanceCallback(log_rates=False)


@pytest.mark.parametrize("restore", ["default", "after setup"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, restore):
    """2 epochs of 3 updates uninterrupted vs resumed from the checkpoint after epoch 1 (3 updates: the
    rebalance at 2 must come back from the checkpoint, the one at 4 happens after the resume)."""
    ckpts = tmp_path / "ckpt"
    cb = TempBalanceCallback(per="update", every=2)
    full, _, rec_full = fit(tmp_path, cb, enable_checkpointing=True, callbacks=[L.callbacks.ModelCheckpoint(
        dirpath=ckpts, filename="{epoch}", save_top_k=-1, every_n_epochs=1)])
    saved = torch.load(ckpts / "epoch=0.ckpt", weights_only=True)
    assert len(saved["optimizer_states"][0]["param_groups"]) == 2  # the original layout
    assert len(saved["lr_schedulers"][0]["base_lrs"]) == 2
    assert saved["callbacks"]["TempBalanceCallback"]["updates"] == 3
    assert saved["callbacks"]["TempBalanceCallback"]["n_balances"] == 2

    class RestoreAfterSetup(SingleDeviceStrategy):  # e.g. DeepSpeed: callback state loaded after on_fit_start
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    cb2 = TempBalanceCallback(per="update", every=2)
    strategy = RestoreAfterSetup(device=torch.device("cpu")) if restore == "after setup" else "auto"
    resumed, trainer, rec = fit(tmp_path / "r", cb2, ckpt_path=ckpts / "epoch=0.ckpt", strategy=strategy)
    assert trainer.global_step == 6 and len(rec.steps) == 3
    check_stepped_rates(rec, first_step=3)
    assert rec.steps == rec_full.steps[3:]
    assert cb2.tempbalance.state_dict() | {"total_balance_s": 0} == cb.tempbalance.state_dict() | {"total_balance_s": 0}
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_resume_a_run_without_tempbalance_with_it(tmp_path):
    """A checkpoint of a plain run (optimizer and LambdaLR over the 2 original groups) resumed with the callback:
    the schedule continues over the split groups, times the multipliers."""
    ckpt = tmp_path / "plain.ckpt"
    model = LitMHA()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader())
    trainer.save_checkpoint(ckpt)
    cb = TempBalanceCallback(per="update", every=2)
    _, trainer, rec = fit(tmp_path, cb, ckpt_path=ckpt)
    assert trainer.global_step == 6 and len(rec.steps) == 3 and cb.tempbalance.n_balances == 3  # start, 4, 6
    check_stepped_rates(rec, first_step=3)


def test_gradient_accumulation_counts_updates_not_micro_batches(tmp_path):
    """accumulate_grad_batches=2: 8 batches are 4 updates; with warmup=2, every=2 the rebalances come after
    updates 2 and 4 (micro-batches 4 and 8), none at the start."""
    cb = TempBalanceCallback(per="update", every=2, warmup=2)
    _, trainer, rec = fit(tmp_path, cb, epochs=1, batches=8, accumulate_grad_batches=2)
    assert len(rec.steps) == trainer.global_step == cb.tempbalance.updates == 4
    assert rec.batch_ends == [(0, 0), (1, 0), (1, 0), (2, 1), (2, 1), (3, 1), (3, 1), (4, 2)]
    assert set(rec.steps[0][1].values()) == {1.0} and len(set(rec.steps[2][1].values())) > 2
    check_stepped_rates(rec)


def test_per_epoch_rebalances_at_each_epoch_end(tmp_path):
    cb = TempBalanceCallback(every=1)  # TempBalance's defaults: per epoch, balance at the start
    _, _, rec = fit(tmp_path, cb, epochs=2, batches=2)
    assert rec.epoch_ends == [2, 3] and cb.tempbalance.epoch == 2 and cb.tempbalance.updates == 4
    assert rec.steps[1][1] == rec.steps[0][1] != rec.steps[2][1]  # constant within an epoch, new after it
    check_stepped_rates(rec)


def test_initial_multipliers_from_a_recommend_file(tmp_path):
    """Multipliers recommended from a saved state dict of the inner network (module="net"), kept (every=0)."""
    from tbdiag.allocation.recommend import recommend

    weights = tmp_path / "net.pt"
    torch.save(LitMHA().net.state_dict(), weights)
    doc = recommend(tbdiag.analyze(weights, fit="median"))
    path = tmp_path / "multipliers.json"
    path.write_text(json.dumps(doc))
    wanted = {unit: entry["multiplier"] for unit, entry in doc["layers"].items()}
    assert len(wanted) == 12 and len(set(wanted.values())) > 2

    cb = TempBalanceCallback(initial=path, module="net", every=0, per="update")
    _, _, rec = fit(tmp_path, cb, epochs=1)
    assert cb.tempbalance.n_balances == 0
    for _, mult in rec.steps:
        assert {u: m for u, m in mult.items() if u != "default"} == wanted
    assert {unit for _, unit in rec.steps[0][0].values()} >= set(wanted)
    check_stepped_rates(rec)

    with pytest.raises(TbdiagError, match="no such tuned unit"):  # names without "net.": the whole module's differ
        fit(tmp_path, TempBalanceCallback(initial=path, every=0), epochs=1)
    with pytest.raises(TbdiagError, match="missing|not found|no such"):
        TempBalanceCallback(initial=tmp_path / "absent.json")
    with pytest.raises(TbdiagError, match="every_epoch"):
        TempBalanceCallback(every_epoch=3)


def test_example_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_tempbalance.py"), "--steps", "20",
                          "--every", "5", "--warmup", "5", "--data", "absent.txt"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "synthetic text" in out.stdout and "20 updates, 4 rebalances" in out.stdout, out.stdout
    assert "effective lr" in out.stdout and "blocks.1.linear1 " in out.stdout, out.stdout


def test_lightning_is_imported_only_by_its_integration():
    """No module of tbdiag but tbdiag/integrations/lightning.py imports lightning (or that module)."""
    offenders = []
    for path in (ROOT / "tbdiag").rglob("*.py"):
        if path == ROOT / "tbdiag" / "integrations" / "lightning.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("lightning", "pytorch_lightning") or n == "tbdiag.integrations.lightning"
                   for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
