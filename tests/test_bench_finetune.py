"""``benchmarks/bench_finetune.py --quick`` runs end to end: the Trainer alone, TempBalance per layer and per
block, paired by seed, with the learning rate chosen on the validation split."""

import re
import subprocess
import sys
from pathlib import Path

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
