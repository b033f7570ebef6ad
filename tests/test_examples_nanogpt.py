"""examples/nanogpt_tempbalance.py: it runs end to end with tiny settings, its warm-up + cosine schedule is
right by hand, and with and without TempBalance a seed sees the same weights and batches."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import imported

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanogpt_tempbalance.py"
TINY = ["--steps", "30", "--layers", "2", "--width", "64", "--block", "32", "--batch", "8", "--eval-every", "10",
        "--tb-warmup", "10", "--tb-every", "10", "--warmup", "5"]


@pytest.fixture(scope="module")
def ng():
    yield from imported(EXAMPLE, "nanogpt_tempbalance")


def test_lr_at_warmup_then_cosine(ng):
    lr = lambda step: ng.lr_at(step, lr=1.0, min_lr=0.1, warmup=10, total=110)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)  # (0 + 1) / 10 of the peak
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)  # the warm-up ends at the peak …
    assert lr(10) == pytest.approx(1.0)  # … where the cosine starts
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # a quarter: 0.868198
    assert lr(35) == pytest.approx(0.8681980515)
    assert lr(60) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert lr(85) == pytest.approx(0.2318019485)
    assert lr(110) == lr(500) == pytest.approx(0.1)  # min_lr at the end and after
    after = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two threads on a busy shared CPU are many times slower
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, env=env,
                          cwd=EXAMPLE.parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_runs_with_builtin_text_and_reports_tempbalance(tmp_path):
    out = run(*TINY, "--data", str(tmp_path / "missing.txt"), "--unit", "block")
    assert "data: built-in sonnets" in out
    vals = [float(v) for v in re.findall(r"val loss (\d+\.\d+)", out)]
    assert len(vals) == 3 and all(math.isfinite(v) for v in vals) and vals[-1] < vals[0]
    assert re.search(r"^TempBalance: 3 rebalances in \d+\.\d+ s \(", out, re.M), out
    mults = [float(m) for m in re.findall(r"× (\d\.\d+)\s+lr", out)]  # blocks.0, blocks.1, default
    assert sorted(mults) == [0.5, 1.0, 1.5], out  # the linear map over two blocks: its two ends


def test_runs_on_tiny_shakespeare():
    data = EXAMPLE.parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if not data.is_file():
        pytest.skip(f"{data} not here")
    out = run(*TINY, "--data", str(data))
    assert "1,115,394 characters" in out and "vocabulary 65" in out
    assert re.search(r"^step +30: train loss \d+\.\d+, val loss \d+\.\d+", out, re.M)
    assert re.search(r"^TempBalance: 3 rebalances", out, re.M)


def test_same_start_and_batches_with_and_without_tempbalance(ng):
    o = ng.Options(steps=12, layers=2, width=64, block=16, batch=4, warmup=2, tb_warmup=8, tb_every=4,
                   eval_every=4, eval_batches=2, quiet=True)
    with_tb = ng.train(o, ng.BUILTIN_TEXT)
    without = ng.train(ng.Options(**{**vars(o), "tempbalance": False}), ng.BUILTIN_TEXT)
    # multipliers are all 1 until the first rebalance at update 8: identical losses up to there, then not
    assert [h["val_loss"] for h in with_tb["history"][:2]] == [h["val_loss"] for h in without["history"][:2]]
    assert with_tb["history"][2]["val_loss"] != without["history"][2]["val_loss"]
    assert with_tb["n_balances"] == 2 and without["n_balances"] == 0
