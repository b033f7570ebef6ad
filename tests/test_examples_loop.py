"""The plain-loop example runs (seeded stand-in images when MNIST is absent) and rebalances every epoch."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tempbalance_in_your_loop.py"


def test_loop_example_runs(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLE), "--mnist", str(tmp_path / "none"), "--epochs", "2",
                          "--train-size", "512"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and "| 2: alpha" in lines[0]  # Sequential layers 2, 4, 6 tuned (not 0 and 8)
    assert " 0: alpha" not in lines[0] and " 8: alpha" not in lines[0]
    assert lines[0].split("|")[1] != lines[1].split("|")[1]  # refitted after the second epoch
