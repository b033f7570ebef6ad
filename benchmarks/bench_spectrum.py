"""The two halves of the spectrum computation against the plain way, side by side.

    python benchmarks/bench_spectrum.py [--rounds 3] [--device cpu]

1. Gram matrix. For LLM- and CNN-shaped bf16 weights it times `tbdiag.esd.spectrum.gram(..., full=False)`
   (what `analyze` runs: only the lower triangle, in column panels) and the same blockwise accumulation
   as one full ``baddbmm`` per block (what tbdiag did before), in float64 and float32, and prints the
   median times, their ratio and the largest difference in the lower triangle relative to the largest entry.
2. Eigensolve of a stack (CPU only). For stacks of Gram matrices (conv kernel positions, FARMS windows)
   it times `tbdiag.esd.spectrum.eigvalsh_shared` (the stack shared out over torch's threads, one BLAS thread
   each) against one ``torch.linalg.eigvalsh`` call (LAPACK's own threading), float64, and prints the
   largest difference of the eigenvalues relative to the largest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tbdiag.esd.spectrum import block_elements, eigvalsh_shared, gram, resolve_device

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
        block = tall[:, start:start + step].to(device).to(dtype)  # (k, b, r)
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

    if device.type != "cpu":
        return
    print("eigensolve of a float64 stack: one eigvalsh call vs shared over threads")
    for k, r in ((9, 256), (9, 512), (16, 1024), (2, 2048)):
        w = torch.randn(k, r + r // 2, r, generator=g, dtype=torch.float64)
        grams = w.mT @ w  # (k, r, r)
        t_one, t_shared = [], []
        for _ in range(args.rounds):
            s, ref = timed(lambda: torch.linalg.eigvalsh(grams), device)
            t_one.append(s)
            s, got = timed(lambda: eigvalsh_shared([grams])[0], device)
            t_shared.append(s)
        a, b = statistics.median(t_one), statistics.median(t_shared)
        print(f"{k:3d} × {r}²{'':17s} one call {a:7.3f} s   shared {b:7.3f} s   one/shared {a / b:4.2f}×   "
              f"max rel. diff {float((got - ref).abs().max() / ref.abs().max()):.1e}")


if __name__ == "__main__":
    main()
