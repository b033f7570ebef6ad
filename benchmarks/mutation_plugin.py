"""pytest plugin of `benchmarks/mutation.sh` (loaded through ``[tool.mutmut] pytest_add_cli_args``).

While mutmut tests a mutant (``MUTANT_UNDER_TEST`` names it), keep only the tests relevant to the mutated
module (`RELEVANT`), leave out the slow integration tests (`SLOW`), and run the rest fastest first (the
durations mutmut recorded), so that a killed mutant usually dies in its first test. The plain test suite,
mutmut's statistics run and its clean run see every test: the plugin does nothing outside a mutant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GAPS = "tests/test_mutation_gaps.py"
RELEVANT = {
    "tbdiag.powerlaw": ("tests/test_powerlaw.py", "tests/test_metrics.py", GAPS),
    "tbdiag.spectrum": ("tests/test_spectrum.py", "tests/test_powerlaw.py", "tests/test_metrics.py", GAPS),
    "tbdiag.layers": ("tests/test_layers.py", "tests/test_checkpoint.py", "tests/test_spectrum.py", GAPS),
    "tbdiag.metrics": ("tests/test_metrics.py", "tests/test_mp.py", GAPS),
    "tbdiag.tempbalance.maps": ("tests/test_tempbalance.py", GAPS),
    "tbdiag.tempbalance.tuned": ("tests/test_tuned.py", "tests/test_tempbalance.py", GAPS),
    "tbdiag.tempbalance.allocate": ("tests/test_allocate.py", GAPS),
    "tbdiag.tempbalance.optim": ("tests/test_optim.py", "tests/test_tempbalance.py", GAPS),
}
SLOW = {  # ≥ 1.5 s each on a 2-core machine: what they check of the math core is covered by faster tests
    "tests/test_tuned.py::test_recommend_on_checkpoint_equals_tempbalance_on_model[gpt2-layer]",
    "tests/test_tempbalance.py::test_block_unit_for_transformer_stacks",
    "tests/test_tempbalance.py::test_effective_lr_is_base_schedule_times_scale",
    "tests/test_tempbalance.py::test_counters_every_warmup_and_timing",
    "tests/test_powerlaw.py::test_pruned_ks_search_is_exact[8]",
    "tests/test_powerlaw.py::test_pareto_exponent_recovered[fit_ks-1.8]",
    "tests/test_allocate.py::test_peft_keys_on_the_real_minilm_folder",
    "tests/test_allocate.py::test_recommend_targets_write_allocation_documents",
    "tests/test_checkpoint.py::test_every_form_gives_the_same_rows",
}


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return
    files = RELEVANT.get(mutant.rsplit(".", 1)[0])
    if files is None:
        return
    stats = Path("mutmut-stats.json")
    durations = json.loads(stats.read_text())["duration_by_test"] if stats.exists() else {}
    keep = [it for it in items if it.nodeid.split("::")[0] in files and it.nodeid not in SLOW]
    kept = {id(it) for it in keep}
    dropped = [it for it in items if id(it) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = sorted(keep, key=lambda it: durations.get(it.nodeid, 0.0))
