"""The Gram matrix: tbdiag's lower-triangle panels against the full product, side by side.

    python benchmarks/bench_gram.py [--rounds 3] [--device cpu]

For LLM- and CNN-shaped bf16 weights it times `tbdiag.spectrum.gram(..., full=False)` (what `analyze`
runs: only the lower triangle, in column panels) and the same blockwise accumulation as one full
``baddbmm`` per block (what tbdiag did before), in float64 and float32, interleaved, and prints the median
times, their ratio and the largest difference in the lower triangle relative to the largest entry.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tbdiag.spectrum import block_elements, gram, resolve_device

SHAPES = {"MLP up 8192×2048": (1, 8192, 2048), "attention q 2048×2048": (1, 2048, 2048),
          "embedding slice 32064×2048": (1, 32064, 2048), "conv 3×3, 512→512": (9, 512, 512),
          "MoE 8 experts 1408×2048": (8, 1408, 2048)}


def full_product(matrices: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The reference: the same row blocks as `gram`, each multiplied out in full."""
    tall = matrices if matrices.shape[1] >= matrices.shape[2] else matrices.mT  # (k, M, r)
    k, rows, r = tall.shape
    step = max(1, block_elements(device, dtype) // max(1, k * r))
    out = torch.zeros((k, r, r), device=device, dtype=dtype)
    for start in range(0, rows, step):
        block = tall[:, start:start + step].to(device=device, dtype=dtype)  # (k, b, r)
        out.baddbmm_(block.mT, block)
    return out


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, medians of {args.rounds} interleaved rounds")
    g = torch.Generator().manual_seed(0)
    for label, shape in SHAPES.items():
        w = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)
        for dtype in (torch.float64, torch.float32):
            full_product(w[:, :64, :64], device, dtype)  # warm up
            t_full, t_panel = [], []
            for _ in range(args.rounds):
                s, ref = timed(lambda: full_product(w, device, dtype), device)
                t_full.append(s)
                s, low = timed(lambda: gram(w, device, dtype, full=False), device)
                t_panel.append(s)
            err = float((low.tril() - ref.tril()).abs().max() / ref.abs().max())
            a, b = statistics.median(t_full), statistics.median(t_panel)
            print(f"{label:28s} {str(dtype).removeprefix('torch.'):8s} full {a:7.3f} s   panels {b:7.3f} s   "
                  f"full/panels {a / b:4.2f}×   max rel. diff {err:.1e}")


if __name__ == "__main__":
    main()
