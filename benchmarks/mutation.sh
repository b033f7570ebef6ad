#!/usr/bin/env bash
# Mutation testing of tbdiag's math core with mutmut 3 (on demand; not part of `pytest`).
#
#   benchmarks/mutation.sh                     # every module, one after the other
#   benchmarks/mutation.sh maps powerlaw       # only these (short names below)
#   MUTATION_JOBS=2 benchmarks/mutation.sh     # parallel test workers (default 1)
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
    [maps]=tbdiag.tempbalance.maps [powerlaw]=tbdiag.powerlaw [metrics]=tbdiag.metrics
    [tuned]=tbdiag.tempbalance.tuned [spectrum]=tbdiag.spectrum [layers]=tbdiag.layers
    [allocate]=tbdiag.tempbalance.allocate [optim]=tbdiag.tempbalance.optim
)
ORDER=(maps powerlaw metrics tuned spectrum layers allocate optim)
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${ORDER[@]}")
for m in "${selected[@]}"; do
    [ -n "${MODULE[$m]:-}" ] || { echo "unknown module $m; use: ${ORDER[*]}" >&2; exit 2; }
done

start=$(date +%s)
for m in "${selected[@]}"; do
    t0=$(date +%s)
    echo "=== ${MODULE[$m]}"
    mkdir -p mutants
    nice -n 15 "$PYTHON" -m mutmut run --max-children "$JOBS" "${MODULE[$m]}.*" > "mutants/run-$m.log" 2>&1 \
        || { tail -n 20 "mutants/run-$m.log"; exit 1; }
    echo "    ${MODULE[$m]}: $(( $(date +%s) - t0 )) s"
done
echo "total: $(( $(date +%s) - start )) s"

"$PYTHON" - "${selected[@]}" <<'EOF'
"""Score per module from mutants/**/*.py.meta: killed (timeouts count as killed) / all mutants."""
import json
import sys
from pathlib import Path

names = {m: f"tempbalance/{m}" for m in ("maps", "tuned", "allocate", "optim")}
killed_codes = {1, 3, 24, -24, 36, 152, 255}  # test failure, pytest internal error, timeouts
grand = [0, 0]
for short in sys.argv[1:]:
    meta = Path("mutants/tbdiag") / f"{names.get(short, short)}.py.meta"
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
