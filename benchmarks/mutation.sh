#!/usr/bin/env bash
# Mutation testing of every tbdiag module that computes or writes a number, with mutmut 3 (on demand; not part of `pytest`).
#
#   benchmarks/mutation.sh                     # every module, one after the other
#   benchmarks/mutation.sh maps powerlaw       # only these (short names: ORDER below)
#   MUTATION_JOBS=2 benchmarks/mutation.sh     # parallel test workers (default 1)
#   benchmarks/mutation.sh --survivors maps    # after adding tests: the last run's survivors of these modules
#                                              # again, against the gap tests only (they survived the rest), and
#                                              # the mutants not tested yet (functions changed since) against all
#
# The configuration (files mutated, tests run, fork-server isolation for torch) is `[tool.mutmut]` in
# pyproject.toml. mutmut copies the package into mutants/ (git-ignored) and, for every mutant, runs only the
# selected tests that call the mutated function, stopping at the first failure. Runs are niced and use
# one thread per worker. At the end the score of each module is printed with its surviving mutants;
# `python -m mutmut show <name>` prints a mutant's diff. Needs `pip install mutmut` (3.x).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
JOBS=${MUTATION_JOBS:-1}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONHASHSEED=0

declare -A MODULE=(
    [maps]=tbdiag.allocation.maps
    [powerlaw]=tbdiag.esd.powerlaw
    [metrics]=tbdiag.esd.metrics
    [selection]=tbdiag.allocation.selection
    [spectrum]=tbdiag.esd.spectrum
    [layers]=tbdiag.esd.layers
    [allocators]=tbdiag.allocation.allocators
    [optim]=tbdiag.tempbalance.optim
    [mp]=tbdiag.esd.mp
    [randomize]=tbdiag.esd.randomize
    [delta]=tbdiag.finetune.delta
    [lora]=tbdiag.finetune.lora
    [lora_config]=tbdiag.finetune.lora_config
    [diff]=tbdiag.finetune.diff
    [magnitude]=tbdiag.pruning.magnitude
    [prune]=tbdiag.pruning.core
    [prune_results]=tbdiag.pruning.results
    [prune_files]=tbdiag.pruning.files
    [prune_tensors]=tbdiag.pruning.tensors
    [recommend]=tbdiag.allocation.recommend
    [balancer]=tbdiag.tempbalance.balancer
    [guards]=tbdiag.tempbalance.guards
    [logs]=tbdiag.tempbalance.logs
    [hf]=tbdiag.integrations.hf
    [lightning]=tbdiag.integrations.lightning
    [export]=tbdiag.analysis.export
    [outputs]=tbdiag.io.outputs
    [recommended]=tbdiag.report.recommended
)
ORDER=(maps powerlaw metrics selection spectrum layers allocators optim mp randomize delta lora lora_config diff magnitude prune prune_results prune_files prune_tensors recommend balancer guards logs hf lightning export outputs recommended)
survivors=0
[ "${1:-}" = "--survivors" ] && { survivors=1; shift; }
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${ORDER[@]}")
for m in "${selected[@]}"; do
    [ -n "${MODULE[$m]:-}" ] || { echo "unknown module $m; use: ${ORDER[*]}" >&2; exit 2; }
done

start=$(date +%s)
runs=("${selected[@]}")
if [ $survivors = 1 ]; then
    # from the last run's mutants/**/*.py.meta: survivors (mutants/survivors.txt) and mutants not tested yet
    "$PYTHON" - $(for m in "${selected[@]}"; do printf '%s ' "${MODULE[$m]}"; done) <<'EOF'
import json
import sys
from pathlib import Path

killed_codes = {1, 3, 24, -24, 36, 152, 255}
survived, untested = [], []
for module in sys.argv[1:]:
    codes = json.loads((Path("mutants") / (module.replace(".", "/") + ".py.meta")).read_text())["exit_code_by_key"]
    survived += [k for k, c in codes.items() if c is not None and c not in killed_codes]
    untested += [k for k, c in codes.items() if c is None]
Path("mutants/survivors.txt").write_text("".join(k + "\n" for k in survived))
Path("mutants/rerun.txt").write_text("".join(k + "\n" for k in survived + untested))
print(f"=== {len(survived)} survivors again, {len(untested)} mutants not tested yet")
EOF
    MUTATION_SURVIVORS="$PWD/mutants/survivors.txt" nice -n 15 "$PYTHON" -m mutmut run --max-children "$JOBS" \
        $(cat mutants/rerun.txt) > mutants/run-survivors.log 2>&1 || { tail -n 20 mutants/run-survivors.log; exit 1; }
    runs=()
fi
for m in "${runs[@]}"; do
    t0=$(date +%s)
    echo "=== ${MODULE[$m]}"
    mkdir -p mutants
    nice -n 15 "$PYTHON" -m mutmut run --max-children "$JOBS" "${MODULE[$m]}.*" > "mutants/run-$m.log" 2>&1 \
        || { tail -n 20 "mutants/run-$m.log"; exit 1; }
    echo "    ${MODULE[$m]}: $(( $(date +%s) - t0 )) s"
done
echo "total: $(( $(date +%s) - start )) s"

"$PYTHON" - $(for m in "${selected[@]}"; do printf '%s=%s ' "$m" "${MODULE[$m]}"; done) <<'EOF'
"""Score per module from mutants/**/*.py.meta: killed (timeouts count as killed) / all mutants."""
import json
import sys
from pathlib import Path

modules = dict(arg.split("=", 1) for arg in sys.argv[1:])  # short name=dotted module
killed_codes = {1, 3, 24, -24, 36, 152, 255}  # test failure, pytest internal error, timeouts
grand = [0, 0]
for short, module in modules.items():
    meta = Path("mutants") / (module.replace(".", "/") + ".py.meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    killed = sum(c in killed_codes for c in codes.values())
    survivors = sorted(k for k, c in codes.items() if c not in killed_codes)
    grand[0] += killed
    grand[1] += len(codes)
    print(f"{short:9s} {killed:4d} / {len(codes):4d} killed  {100 * killed / max(1, len(codes)):5.1f} %")
    for k in survivors:
        print(f"    survived ({codes[k]}): {k}")
print(f"{'all':9s} {grand[0]:4d} / {grand[1]:4d} killed  {100 * grand[0] / max(1, grand[1]):5.1f} %")
EOF
