"""The Hugging Face Trainer example runs end to end (tiny BERT, few steps) and rebalances."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer_tempbalance.py"


def test_hf_example_runs(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "6", "--tiny", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "model: tiny BERT; eval loss" in res.stdout
    assert "TempBalance: 6 rebalances" in res.stdout  # every update (6 // 5 = 1) after a warm-up of 1
    assert (tmp_path / "run" / "checkpoint-6" / "tbdiag_tempbalance.json").is_file()
