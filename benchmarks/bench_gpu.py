"""GPU figures: ResNet18 analyze time on CUDA (float64 and float32, against the CPU) and the analyze time
per GB of a 7B-shaped synthetic bf16 checkpoint. Run through ``benchmarks/gpu_check.sh``.

    python benchmarks/bench_gpu.py [--layers 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tbdiag.analysis.core import analyze
from tbdiag.train.models import MODELS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm import build  # noqa: E402


def timed(fn, rounds: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4, help="blocks of the 7B-shaped checkpoint")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in MODELS["resnet18"](num_classes=100).state_dict().items()}
    analyze(state, device="cuda")  # warm up CUDA and cuSOLVER
    cpu_s, cpu = timed(lambda: analyze(state, device="cpu", fit="ks"), rounds=1)
    for precision in ("float64", "float32"):
        s, gpu = timed(lambda: analyze(state, device="cuda", fit="ks", precision=precision))
        diff = max(abs(a.alpha - b.alpha) for a, b in zip(gpu.layers, cpu.layers))
        print(f"ResNet18 ks, cuda {precision}: {s * 1000:.0f} ms (cpu float64 {cpu_s * 1000:.0f} ms, {cpu_s / s:.1f}×); "
              f"max |Δalpha| vs cpu float64 {diff:.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.layers, 4096, 11008, 32000, 4096)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        for precision in ("float64", "float32"):
            s, res = timed(lambda: analyze(str(folder), device="cuda", precision=precision), rounds=1)
            print(f"7B-shaped ({args.layers} of 32 blocks, {size / 1e9:.2f} GB bf16, {len(res.layers)} layers), "
                  f"cuda {precision}: {s:.1f} s = {s / (size / 1e9):.2f} s per GB "
                  f"(a full 13.5 GB 7B ≈ {s / (size / 1e9) * 13.5:.0f} s)")


if __name__ == "__main__":
    main()
