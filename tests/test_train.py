import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    assert (ck / "best.safetensors").is_file() and not list(ck.glob("epoch-0001*"))
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


def test_ddp_two_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tbdiag",
           "train", *SMALL, "--epochs", "2", "--method", "tb", "--out", str(out)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
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
    cases = {
        "unknown model": (["--model", "gpt5", "--data", "synthetic"], "unknown model"),
        "unknown data": ([*SMALL, "--data", "imagenet"], "unknown data set"),
        "unknown method": ([*SMALL, "--method", "adam"], "unknown method"),
        "missing data dir": (["--model", "mlp", "--data", "mnist", "--data-dir", tmp_path / "nope"], "no such file"),
        "wrong format": (["--model", "mlp", "--data", "mnist", "--data-dir", tmp_path], "no train-images"),
        "init mismatch": ([*SMALL, "--init-from", tmp_path / "other.safetensors"], "names do not match"),
        "multipliers for other layers": ([*SMALL, "--multipliers", tmp_path / "wrong.json"], "no such tuned layer"),
        "multipliers schema": ([*SMALL, "--multipliers", tmp_path / "schema.json"], "not tbdiag.multipliers/v1"),
        "vgg on 28x28": (["--model", "vgg16", "--data", "mnist", "--data-dir", "x"], "no such file"),
    }
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


def test_augmentation_crops_and_flips():
    from tbdiag.train.loop import augment

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
