#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests, then the GPU benchmarks, printing their figures.
# Uses the machine's own python3 and CUDA build of torch (nothing is installed; the repo is on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
echo "== GPU tests"
$PY -m pytest -q -p no:cacheprovider tests/test_spectrum.py tests/test_powerlaw.py tests/test_metrics.py
echo "== analyze on the GPU (CLI)"
$PY -m tbdiag analyze sample_checkpoints/cnn_trained.safetensors --device cuda --fit ks -q --json - | $PY -c "import json,sys; d=json.load(sys.stdin); print('device', d['timing']['device'], 'layers', len(d['layers']))"
echo "== GPU benchmarks"
$PY benchmarks/bench_gpu.py "$@"
echo "== Gram: lower-triangle panels vs the full product on the GPU"
$PY benchmarks/bench_spectrum.py --device cuda --rounds 3
echo "== analyze benchmark (CPU vs CUDA figures above)"
$PY benchmarks/bench_analyze.py --rounds 1 --models resnet18 --no-ww
