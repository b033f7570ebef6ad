"""Alpha-allocated pruning of a fine-tuned pretrained transformer: all-MiniLM-L6-v2 on AG News.

    python benchmarks/bench_prune_finetuned.py            # 5 seeds, about 15 minutes on 2 CPU cores
    python benchmarks/bench_prune_finetuned.py --quick    # a tiny BERT on built-in texts (< 1 min)

For each seed, MiniLM with a new 4-class head is fine-tuned by the Trainer on 64 texts per class (the
`bench_finetune` setting, learning rate ``--lr``), then pruned one-shot by magnitude — no retraining — and
evaluated on the fixed 1,000 test texts. Allocations over the Linear layers of the six blocks (the
embeddings, the pooler and the head stay dense, as AlphaPruning leaves them):

- ``uniform``: S everywhere;
- ``alpha/layer``: AlphaPruning per layer (`tbdiag.prune`'s allocation, ``peak`` fit, ε = 0.3);
- ``alpha/block``: AlphaPruning per block (the block's mean alpha);
- ``depth/block``: the control — the same allocator fed each block's *depth* instead of its alpha, so later
  blocks are pruned more by exactly the spread alpha/block may give them. If alpha/block beats uniform
  and depth/block does not, the gain comes from alpha, not from "later blocks get more".

Each allocation is paired with uniform on the same fine-tuned model; printed: mean ± std accuracy, the
paired difference with its 95 % t interval and whether it exceeds two standard errors.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import DATA, Setup, accuracy, paired, splits, train  # noqa: E402

ALLOCATIONS = ("uniform", "alpha/layer", "alpha/block", "depth/block")


def allotments(model: torch.nn.Module, sparsity: float, allocation: str) -> list:
    """Per-tensor sparsities of an allocation (`tbdiag.pruning.core.allocate` on the live model)."""
    from tbdiag.io.checkpoint import open_checkpoint
    from tbdiag.pruning.results import PruneOptions
    from tbdiag.pruning.core import allocate
    from tbdiag.allocation.allocators import sparsity as alpha_sparsities
    from tbdiag.allocation.selection import block_of

    kind, _, unit = allocation.partition("/")
    options = PruneOptions(sparsity, "uniform" if kind == "uniform" else "alpha", unit=unit or "layer")
    chosen = allocate(open_checkpoint(model), options, device="cpu")
    if kind != "depth":
        return [(a.tensor, a.n_target) for a in chosen]
    blocks = list(dict.fromkeys(block_of(a.name) for a in chosen))  # model order: depth 0, 1, …
    sizes = [sum(a.n_params for a in chosen if block_of(a.name) == b) for b in blocks]
    share = dict(zip(blocks, alpha_sparsities([float(d) for d in range(len(blocks))], sizes, sparsity,
                                              options.epsilon, options.max_sparsity)))
    return [(a.tensor, math.floor(share[block_of(a.name)] * a.n_params + 0.5)) for a in chosen]


def pruned_accuracy(trainer, setup: Setup, sparsity: float, allocation: str) -> float:  # noqa: ANN001
    """Test accuracy after pruning a copy of the trained weights in place (restored afterwards)."""
    from tbdiag.pruning.magnitude import prune_smallest_

    state = trainer.model.state_dict()
    saved = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for tensor, k in allotments(trainer.model, sparsity, allocation):
            prune_smallest_(state[tensor].view(-1), k)
        acc = accuracy(trainer, setup.encode(setup.test))
        for k, v in saved.items():
            state[k].copy_(v)
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-5, help="fine-tuning rate (bench_finetune's choice at 64/class)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--data", type=Path, default=DATA)
    a = p.parse_args()
    if a.quick:
        a.seeds, a.per_class, a.lr, a.sparsities = 2, 4, 1e-3, [0.5]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    setup = Setup(a.quick, 16 if a.quick else 64, a.data)
    start = time.perf_counter()
    acc: dict[tuple[float, str], list[float]] = {}
    dense = []
    for seed in range(a.seeds):
        trainer, _, _ = train(setup, splits(setup, a.per_class, seed, 1)[0], seed, a.lr, "baseline",
                              2 if a.quick else 10)
        dense.append(accuracy(trainer, setup.encode(setup.test)))
        for s in a.sparsities:
            for allocation in ALLOCATIONS:
                acc.setdefault((s, allocation), []).append(pruned_accuracy(trainer, setup, s, allocation))
    print(f"dense: {statistics.fmean(dense):.4f} ± {statistics.pstdev(dense):.4f} ({a.seeds} seeds)")
    print(f"{'S':>4s} {'allocation':12s} {'test acc (mean ± std)':22s} paired vs uniform [95 % CI]")
    for s in a.sparsities:
        for allocation in ALLOCATIONS:
            xs = acc[(s, allocation)]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            diff = "—" if allocation == "uniform" else paired([x - u for x, u in zip(xs, acc[(s, "uniform")])])
            print(f"{s:4.0%} {allocation:12s} {statistics.fmean(xs):.4f} ± {sd:.4f}       {diff}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
