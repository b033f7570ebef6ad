"""pytest plugin of `benchmarks/mutation.sh` (loaded through ``[tool.mutmut] pytest_add_cli_args``).

While mutmut tests a mutant (``MUTANT_UNDER_TEST`` names it), keep only the tests relevant to the mutated
module (`RELEVANT`), leave out the slow integration tests (`SLOW`), and run the rest fastest first (the
durations mutmut recorded), so that a killed mutant usually dies in its first test. A mutant that survived an
earlier run (listed in ``$MUTATION_SURVIVORS``) meets only the tests written against survivors (`GAPS`). The plain test suite,
mutmut's statistics run and its clean run see every test: the plugin does nothing outside a mutant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GAPS = ("tests/test_mutation_gaps.py", "tests/test_gaps_pruning.py", "tests/test_gaps_finetune.py",
        "tests/test_gaps_tempbalance.py", "tests/test_gaps_outputs.py", "tests/test_gaps_files.py")  # tests written against survivors
RELEVANT = {
    "tbdiag.allocation.maps": ("tests/test_tempbalance.py", *GAPS),
    "tbdiag.esd.powerlaw": ("tests/test_powerlaw.py", "tests/test_metrics.py", *GAPS),
    "tbdiag.esd.metrics": ("tests/test_metrics.py", "tests/test_mp.py", *GAPS),
    "tbdiag.allocation.selection": ("tests/test_tuned.py", "tests/test_tempbalance.py", *GAPS),
    "tbdiag.esd.spectrum": ("tests/test_spectrum.py", "tests/test_powerlaw.py", "tests/test_metrics.py", *GAPS),
    "tbdiag.esd.layers": ("tests/test_layers.py", "tests/test_checkpoint.py", "tests/test_spectrum.py", *GAPS),
    "tbdiag.allocation.allocators": ("tests/test_allocate.py", *GAPS),
    "tbdiag.tempbalance.optim": ("tests/test_optim.py", "tests/test_tempbalance.py", *GAPS),
    "tbdiag.esd.mp": ("tests/test_mp.py", "tests/test_metrics.py", *GAPS),
    "tbdiag.esd.randomize": ("tests/test_finetune.py", "tests/test_views.py", *GAPS),
    "tbdiag.finetune.delta": ("tests/test_finetune.py", "tests/test_views.py", *GAPS),
    "tbdiag.finetune.lora": ("tests/test_finetune.py", "tests/test_views.py", *GAPS),
    "tbdiag.finetune.lora_config": ("tests/test_finetune.py", "tests/test_views.py", *GAPS),
    "tbdiag.finetune.diff": ("tests/test_views.py", "tests/test_finetune.py", *GAPS),
    "tbdiag.pruning.magnitude": ("tests/test_prune.py", "tests/test_prune_edges.py", *GAPS),
    "tbdiag.pruning.core": ("tests/test_prune.py", "tests/test_prune_edges.py", *GAPS),
    "tbdiag.pruning.results": ("tests/test_prune.py", "tests/test_prune_edges.py", *GAPS),
    "tbdiag.pruning.files": ("tests/test_prune.py", "tests/test_prune_edges.py", "tests/test_outputs.py", *GAPS),
    "tbdiag.pruning.tensors": ("tests/test_prune.py", "tests/test_prune_edges.py", *GAPS),
    "tbdiag.allocation.recommend": ("tests/test_allocate.py", "tests/test_tuned.py", "tests/test_cli.py", *GAPS),
    "tbdiag.tempbalance.balancer": ("tests/test_tempbalance.py", "tests/test_tempbalance_edges.py", "tests/test_optim.py", *GAPS),
    "tbdiag.tempbalance.guards": ("tests/test_tempbalance_edges.py", "tests/test_tempbalance.py", *GAPS),
    "tbdiag.tempbalance.logs": ("tests/test_tempbalance_edges.py", "tests/test_hf.py", "tests/test_lightning.py", *GAPS),
    "tbdiag.integrations.hf": ("tests/test_hf.py", "tests/test_tempbalance_edges.py", *GAPS),
    "tbdiag.integrations.lightning": ("tests/test_lightning.py", "tests/test_tempbalance_edges.py", *GAPS),
    "tbdiag.analysis.export": ("tests/test_cli.py", "tests/test_report.py", "tests/test_errors.py", *GAPS),
    "tbdiag.io.outputs": ("tests/test_outputs.py", *GAPS),
    "tbdiag.report.recommended": ("tests/test_report.py", *GAPS),
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


def _survivors() -> set[str]:
    """Mutants named in ``$MUTATION_SURVIVORS`` (a file, one name a line: `benchmarks/mutation.sh --survivors`)."""
    path = os.environ.get("MUTATION_SURVIVORS")
    return set(Path(path).read_text().split()) if path else set()


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return
    files = RELEVANT.get(mutant.rsplit(".", 1)[0])
    if files is None:
        return
    if mutant in _survivors():  # it survived every other test already: only the tests written since can kill it
        files = GAPS
    stats = Path("mutmut-stats.json")
    durations = json.loads(stats.read_text())["duration_by_test"] if stats.exists() else {}
    keep = [it for it in items if it.nodeid.split("::")[0] in files and it.nodeid not in SLOW]
    kept = {id(it) for it in keep}
    dropped = [it for it in items if id(it) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = sorted(keep, key=lambda it: durations.get(it.nodeid, 0.0))
