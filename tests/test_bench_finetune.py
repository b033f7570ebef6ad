"""``benchmarks/bench_finetune.py --quick`` runs end to end: the Trainer alone, TempBalance per layer and per
block, paired by seed, with the learning rate chosen on the validation split."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_every_method_paired_with_the_baseline():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert re.search(r"4 per class: validation accuracy by lr 0\.001: [01]\.\d{3} → lr 0\.001", out), out
    rows = {m: re.search(rf"^{m} +(\d\.\d{{4}}) ± (\d\.\d{{4}}) +(.*?) +(\d+\.\d{{3}}) \(from (\d+\.\d{{3}})\) +(\d+\.\d) %$",
                         out, re.M) for m in ("baseline", "tb-layer", "tb-block")}
    assert all(rows.values()), out
    assert rows["baseline"].group(3).strip() == "—" and float(rows["baseline"].group(6)) == 0.0
    for m in ("tb-layer", "tb-block"):
        assert re.match(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] \((within|beyond) 2 SE; \d/2 up\)",
                        rows[m].group(3)), rows[m].group(3)
        assert float(rows[m].group(6)) > 0  # TempBalance's rebalances took measurable time
    assert len({r.group(5) for r in rows.values()}) == 1  # one pretrained spread, the same for every method


def test_prune_benchmark_allocations_and_the_depth_control():
    """bench_prune_finetuned: every allocation meets the mean sparsity, the depth control prunes later blocks
    more, and evaluating a pruned model leaves the trained weights as they were."""
    import importlib
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench_prune_finetuned")
    setup = bench.Setup(True, 16)
    model = setup.model(0)
    for allocation in bench.ALLOCATIONS:
        cuts = bench.allotments(model, 0.5, allocation)
        sizes = {name: p.numel() for name, p in model.named_parameters()}
        assert sum(k for _, k in cuts) == pytest.approx(0.5 * sum(sizes[t] for t, _ in cuts), abs=len(cuts))
    depth = dict(bench.allotments(model, 0.5, "depth/block"))
    first = [k / model.get_parameter(t).numel() for t, k in depth.items() if ".layer.0." in t]
    last = [k / model.get_parameter(t).numel() for t, k in depth.items() if ".layer.1." in t]
    assert max(first) < min(last)  # the deeper block is pruned more: depth alone decides
    trainer, _, _ = bench.train(setup, list(range(8)), 0, 1e-3, "baseline", 1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    acc = bench.pruned_accuracy(trainer, setup, 0.5, "alpha/layer")
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
