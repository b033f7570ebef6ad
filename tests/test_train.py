import json
import math
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tbdiag.cli import app

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--model", "cnn", "--data", "synthetic", "--synthetic-size", "256", "--batch-size", "64", "--device", "cpu",
         "--width", "0.5"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["cal", "tb", "snr", "tb+snr", "sgdr"])
def test_every_method_trains_and_writes_a_run_folder(tmp_path, method):
    res = run("train", *SMALL, "--epochs", "2", "--method", method, "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    recs = records(tmp_path / "r")
    assert [r["epoch"] for r in recs] == [1, 2]
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "layers"} <= set(recs[0])
    assert recs[0]["lr"] == pytest.approx(0.05)
    ck = tmp_path / "r" / "checkpoints"
    assert json.loads((ck / "last.json").read_text())["epoch"] == 2
    assert (ck / "best.safetensors").is_file()
    assert sorted(p.name for p in ck.glob("epoch-*")) == [f"epoch-000{e}.{k}" for e in (1, 2) for k in ("safetensors", "state.pt")]
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["method"] == method and config["epochs"] == 2
    if method in ("tb", "tb+snr"):
        layers = recs[1]["layers"]
        assert set(layers) == {"features.3", "features.6"}
        lo, hi = (0.5, 1.5) if method == "tb" else (0.6, 1.4)
        assert sorted(v["lr"] / recs[1]["lr"] for v in layers.values()) == pytest.approx([lo, hi])
        assert all(v["alpha"] > 1 for v in layers.values())


def train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tbdiag", "train", *SMALL, "--synthetic-size", "1024", "--epochs", "5",
            "--method", "tb+snr", "--out", str(out), *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    subprocess.run(train_cmd(full), check=True, env=ENV, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "last.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["epoch"] >= 2:
            break
        time.sleep(0.01)
    time.sleep(0.05)  # somewhere inside the next epoch or its checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = json.loads(pointer.read_text())["epoch"]
    assert done_before < 5, "the run finished before it could be killed; the test proves nothing"
    res = subprocess.run([sys.executable, "-m", "tbdiag", "train", "--resume", str(killed)], env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a = load_file(full / "checkpoints" / "epoch-0005.safetensors")
    b = load_file(killed / "checkpoints" / "epoch-0005.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(records(full)) == strip(records(killed))


def test_init_from_and_recommended_multipliers(tmp_path):
    assert run("train", *SMALL, "--epochs", "1", "--method", "cal", "--out", tmp_path / "a").exit_code == 0
    ckpt = tmp_path / "a" / "checkpoints" / "best.safetensors"
    res = run("recommend", ckpt, "--lr", "0.05", "--out", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    mult = json.loads((tmp_path / "m.json").read_text())
    assert mult["schema"] == "tbdiag.multipliers/v1" and set(mult["layers"]) == {"features.3", "features.6"}
    res = run("train", *SMALL, "--epochs", "1", "--method", "cal", "--init-from", ckpt, "--multipliers",
              tmp_path / "m.json", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    layers = records(tmp_path / "b")[0]["layers"]
    for name, entry in mult["layers"].items():
        assert layers[name]["lr"] == pytest.approx(entry["lr"])


def test_ddp_two_processes_agree_on_an_uneven_split(tmp_path):
    # 257 images over 2 ranks: 129 + 128 before padding, which with batch 128 made rank 0 take a step more than
    # rank 1 and the DDP collectives deadlock; now both ranks take ⌈257 / 2⌉ = 129 images (2 steps).
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tbdiag",
           "train", *SMALL, "--synthetic-size", "257", "--batch-size", "128", "--epochs", "2", "--method", "tb",
           "--out", str(out)]
    res = subprocess.run(cmd, env={**ENV, "TBDIAG_TIMEOUT_MIN": "1"}, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["multipliers"] == ranks[1]["multipliers"] and len(ranks[0]["multipliers"]) == 3
    assert len(records(out)) == 2


def test_bad_train_inputs_fail_before_training(tmp_path):
    save_file({"fc.weight": torch.randn(3, 3)}, tmp_path / "other.safetensors")
    (tmp_path / "wrong.json").write_text(json.dumps({"schema": "tbdiag.multipliers/v1",
                                                      "layers": {"encoder.fc": {"multiplier": 1.2}}}))
    (tmp_path / "schema.json").write_text(json.dumps({"schema": "tbdiag.analysis/v1"}))
    assert run("train", *SMALL, "--epochs", "1", "--method", "tb", "--out", tmp_path / "ok").exit_code == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    cases = {
        "no data dir": (["--model", "mlp", "--data", "mnist"], "error: --data-dir missing: data set mnist is read from"),
        "missing data dir": (["--model", "mlp", "--data", "mnist", "--data-dir", tmp_path / "nope"], "no such file"),
        "wrong format": (["--model", "mlp", "--data", "mnist", "--data-dir", tmp_path], "no train-images"),
        "init mismatch": ([*SMALL, "--init-from", tmp_path / "other.safetensors"], "names do not match"),
        "multipliers for other layers": ([*SMALL, "--multipliers", tmp_path / "wrong.json"], "encoder.fc: no such tuned"),
        "multipliers schema": ([*SMALL, "--multipliers", tmp_path / "schema.json"], "not tbdiag.multipliers/v1"),
        "vgg on 28x28": (["--model", "vgg16", "--data", "npz", "--data-dir", tmp_path / "28.npz"], "needs 32×32 images"),
    }
    x, y = torch.zeros(20, 28, 28, dtype=torch.uint8).numpy(), (torch.arange(20) % 2).numpy()
    np.savez(tmp_path / "28.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    for label, (args, message) in cases.items():
        out = tmp_path / label.replace(" ", "_")
        res = run("train", *args, "--out", out)
        assert res.exit_code == 2, (label, res.output)
        assert message in res.stderr and "Traceback" not in res.output, (label, res.stderr)
        assert not out.exists(), label
    res = run("train", "--resume", tmp_path / "ok", "--lr", "0.3")
    assert res.exit_code == 2 and "different configuration" in res.stderr and "lr=None, not 0.3" in res.stderr
    res = run("train", *SMALL, "--out", tmp_path / "ok")
    assert res.exit_code == 2 and "already holds a run" in res.stderr
    res = run("train", "--resume", tmp_path / "nothing")
    assert res.exit_code == 2 and "not a training run" in res.stderr
    res = run("train", *SMALL, "--out", tmp_path / "full")  # a folder of other files is not a run folder
    assert res.exit_code == 2 and "not an empty folder" in res.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_augmentation_crops_and_flips():
    from tbdiag.train.batches import augment

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # every output is a 32×32 window of the zero-padded image, possibly mirrored
        padded = torch.nn.functional.pad(x[i], (4, 4, 4, 4))
        windows = [padded[:, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    again = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_cifar_sized_resnet_trains(tmp_path):
    res = run("train", "--model", "resnet18", "--width", "0.125", "--data", "synthetic", "--synthetic-size", "64",
              "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    rec = records(tmp_path / "r")[0]
    assert rec["lr"] == pytest.approx(0.1) and len(rec["layers"]) >= 10


@pytest.mark.parametrize("method", ["cal", "sgdr"])
def test_resume_continues_runs_without_tempbalance(tmp_path, method):
    out = tmp_path / "r"
    assert run("train", *SMALL, "--epochs", "1", "--method", method, "--out", out).exit_code == 0
    res = run("train", "--resume", out, "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2  # the extension is recorded


def test_snr_adds_the_top_singular_term_to_the_gradient():
    from tbdiag.train.snr import SpectralNormRegularizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Conv2d(3, 8, 3))
    for m in model:
        m.weight.grad = torch.zeros_like(m.weight)
    snr = SpectralNormRegularizer(model, strength=0.1, iterations=200)
    snr.apply()
    for m in model:
        w = m.weight.detach().flatten(1).double()
        u, s, vh = torch.linalg.svd(w)
        expected = 0.1 * s[0] * torch.outer(u[:, 0], vh[0])
        assert torch.allclose(m.weight.grad.flatten(1).double(), expected, atol=1e-5)


# ---- robustness: resume from damaged run folders, option validation, choices, uneven DDP splits ----

FINISHED = dict(model="cnn", data="synthetic", synthetic_size=256, batch_size=64, epochs=3, method="tb+snr", width=0.5)
STRIP = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731 - no timings


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 3-epoch tb+snr run (TempBalance and SNR state in its checkpoints), never modified: tests copy it."""
    from tbdiag.runs.config import TrainConfig
    from tbdiag.train.loop import train

    folder = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(**FINISHED), folder, device="cpu")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, resumed_after, skipped", [
    (["epoch-0003.safetensors"], 2, ["epoch-0003.safetensors"]),
    (["epoch-0003.state.pt"], 2, ["epoch-0003.state.pt"]),
    (["last.json", "epoch-0003.safetensors"], 2, ["last.json", "epoch-0003.safetensors"]),
    (["last.json"], 3, ["last.json"]),
])
def test_resume_skips_unreadable_checkpoints(finished, tmp_path, caplog, damage, resumed_after, skipped):
    from tbdiag.runs.folder import read_config
    from tbdiag.train.loop import train

    ck = finished / "checkpoints"
    assert sorted(p.name for p in ck.glob("epoch-*")) == [f"epoch-000{e}.{k}" for e in (2, 3) for k in ("safetensors", "state.pt")]
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    for name in damage:
        truncate(run_dir / "checkpoints" / name)
    with caplog.at_level(logging.INFO):
        history = train(read_config(run_dir), run_dir, device="cpu", resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "tbdiag.runs.folder"]
    assert len(warnings) == 1 and f"resuming after epoch {resumed_after}" in warnings[0], warnings
    assert all(name in warnings[0] for name in skipped), warnings
    assert f"resuming {run_dir} after epoch {resumed_after}" in caplog.text
    assert len(history) == 3 and STRIP(records(run_dir)) == STRIP(records(finished))
    a, b = load_file(ck / "epoch-0003.safetensors"), load_file(run_dir / "checkpoints" / "epoch-0003.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the redone epoch, bit for bit
    assert json.loads((run_dir / "checkpoints" / "last.json").read_text())["epoch"] == 3  # repaired


def test_resume_with_no_readable_checkpoint_is_refused(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    for e in (2, 3):
        truncate(run_dir / "checkpoints" / f"epoch-000{e}.state.pt")
    before = snapshot(run_dir)
    res = run("train", "--resume", run_dir)
    assert res.exit_code == 2 and "no readable checkpoint pair" in res.stderr, res.output
    assert "epoch-0002.state.pt" in res.stderr and "epoch-0003.state.pt" in res.stderr
    assert snapshot(run_dir) == before


def test_resume_cannot_shorten_a_run(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    res = run("train", "--resume", run_dir, "--epochs", "2")
    assert res.exit_code == 2 and "completed 3 epochs" in res.stderr and "Traceback" not in res.output, res.output
    assert res.stderr.count("\n") == 1 and snapshot(run_dir) == before  # config.json not rewritten
    res = run("train", "--resume", run_dir, "--epochs", "3")  # as many as done: nothing to train
    assert res.exit_code == 0, res.output
    assert snapshot(run_dir) == before


def test_report_reads_a_half_written_metrics_file(finished, tmp_path, caplog):
    from tbdiag.report.render import write_report

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 40])  # the last record cut mid-line
    (run_dir / "checkpoints" / "last.json").write_text('{"epoch": 3, "wei')
    with caplog.at_level(logging.WARNING):
        assert write_report([str(run_dir)], tmp_path / "r.html") == "run"
    html = (tmp_path / "r.html").read_text()
    assert "2 / 3" in html and "ESD of features.3" in html  # two epochs; the last weights found without last.json
    assert "metrics.jsonl: skipped its last line" in caplog.text and "last.json" in caplog.text
    lines = text.splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")  # broken in the middle: an error
    res = run("report", run_dir, "--out", tmp_path / "r2.html")
    assert res.exit_code == 2 and "line 2 is not an epoch record" in res.stderr, res.output
    assert not (tmp_path / "r2.html").exists()


def test_reports_read_run_folders_without_training_code():
    import ast

    import tbdiag

    root = Path(tbdiag.__file__).parent
    for path in [*(root / "runs").glob("*.py"), *(root / "report").glob("*.py")]:
        tree = ast.parse(path.read_text())
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m.startswith("tbdiag.train")], path
    assert "tbdiag.runs.folder" in (root / "report" / "render.py").read_text()


@pytest.mark.parametrize("n, size", [(257, 2), (256, 2), (10, 3), (2, 4), (1, 1)])
def test_every_rank_gets_the_same_number_of_images(n, size):
    from tbdiag.train.batches import rank_order

    shares = [rank_order(n, torch.Generator().manual_seed(7), rank, size) for rank in range(size)]
    assert {len(s) for s in shares} == {-(-n // size)}
    assert set(torch.cat(shares).tolist()) == set(range(n))
    if size == 1:
        assert torch.equal(shares[0], torch.randperm(n, generator=torch.Generator().manual_seed(7)))


BAD_OPTIONS = [
    ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "1e300"), ("--weight-decay", "1e39"),
    ("--momentum", "1"), ("--momentum", "-0.5"),
    ("--weight-decay", "-1e-4"), ("--epochs", "0"), ("--batch-size", "0"), ("--width", "0"), ("--width", "0.01"),
    ("--synthetic-size", "0"), ("--synthetic-size", "5"), ("--train-subset", "-1"), ("--train-subset", "300"),
    ("--tb-min-ratio", "0"), ("--tb-min-ratio", "2"), ("--tb-max-ratio", "inf"), ("--tb-every", "-1"),
    ("--snr-strength", "-0.01"), ("--sgdr-period", "0"), ("--sgdr-mult", "0"), ("--seed", "-1"),
]


def test_every_numeric_option_is_checked(tmp_path):
    for flag, value in BAD_OPTIONS:
        out = tmp_path / f"{flag}{value}"
        res = run("train", *SMALL, "--method", "sgdr", flag, value, "--out", out)
        assert res.exit_code == 2, (flag, value, res.output)
        assert res.stderr.startswith(f"error: {flag} ") and res.stderr.count("\n") == 1, (flag, value, res.stderr)
        assert "Traceback" not in res.output and not out.exists(), (flag, value)


def test_config_errors_name_fields_not_options(tmp_path):
    from tbdiag.errors import TbdiagError
    from tbdiag.runs.config import ConfigError, TrainConfig
    from tbdiag.runs.folder import read_config
    from tbdiag.train.schedules import warm_restarts

    for bad in ({"sgdr_period": 0}, {"momentum": 1.0}, {"epochs": 2.5}, {"model": "gpt5"}, {"tb_max_ratio": 0.4}):
        with pytest.raises(ConfigError) as err:
            TrainConfig(**{"data": "synthetic", **bad})
        assert "--" not in str(err.value) and err.value.field in str(err.value)
    with pytest.raises(TbdiagError, match="restarts would not advance"):
        warm_restarts(3, period=0)  # looped forever before
    assert warm_restarts(3, period=1, mult=1) == 1.0
    (tmp_path / "config.json").write_text(json.dumps({"data": "synthetic", "batch_size": 0}))
    with pytest.raises(TbdiagError, match="unreadable run config"):
        read_config(tmp_path)


def test_help_shows_defaults_and_choices_and_typos_fail():
    from tbdiag.runs.config import CHOICES

    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0
    for field, names in CHOICES.items():
        assert f"<{'|'.join(names)}>" in res.output, field
    for text in ("Epochs, ≥ 1 (default 200)", "(default 128)", "(default 5e-4)", "(default 0.9)", "(default 0.1 ResNet",
                 "(default 0.01)", "(default 10)", "(default 0: all)", "(default 0.5; 0.6 with tb+snr)"):
        assert text in res.output, text
    for flag, typo in (("--model", "resnet19"), ("--method", "tb-snr"), ("--data", "cifar"), ("--tb-map", "cubic"),
                       ("--tb-fit", "mle"), ("--tb-metric", "loss")):
        res = run("train", "--data", "synthetic", flag, typo, "--out", "never")
        assert res.exit_code == 2 and "is not one of" in res.output, (flag, res.output)
    assert not Path("never").exists()


def test_choices_match_what_the_trainer_implements():
    from tbdiag.esd.powerlaw import FITS
    from tbdiag.runs.config import CHOICES
    from tbdiag.tempbalance import MAPS, METRIC_FIELDS
    from tbdiag.train.data import DATASETS
    from tbdiag.train.loop import METHODS
    from tbdiag.train.models import MODELS, NARROWEST

    assert CHOICES["model"] == tuple(MODELS) == tuple(NARROWEST)
    assert set(CHOICES["tb_map"]) == set(MAPS) and set(CHOICES["tb_fit"]) == set(FITS)
    assert set(CHOICES["tb_metric"]) == set(METRIC_FIELDS)
    assert CHOICES["data"] == DATASETS and CHOICES["method"] == METHODS


@pytest.mark.parametrize("method", ["cal", "tb"])
def test_extending_a_finished_run_follows_the_longer_schedule(tmp_path, method):
    """--resume with more --epochs: the next epoch's rate comes from the cosine over the new total (it was the
    old schedule's end, 0: the extension trained at rate 0)."""
    out = tmp_path / "run"
    assert run("train", *SMALL, "--epochs", "2", "--method", method, "--out", out).exit_code == 0
    assert run("train", "--resume", out, "--epochs", "4").exit_code == 0
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr0 = 0.05
    assert lrs[:2] == pytest.approx([lr0, lr0 * 0.5])  # the first two epochs, planned over 2
    assert lrs[2:] == pytest.approx([lr0 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (2, 3)])
