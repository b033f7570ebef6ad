"""Character-level language modelling on tiny Shakespeare: AdamW + warm-up/cosine with and without TempBalance.

    python benchmarks/bench_lm.py [--steps 250 --seeds 3 --methods all --out bench_lm.json]

The nanoGPT-style model of ``examples/nanogpt_tempbalance.py`` (6 blocks, width 128, 4 heads, context 64:
1.2M parameters) on ``--data`` (the first 90 % of the characters train, the last 10 % validate). Every method
trains with AdamW (β 0.9/0.99, weight decay 0.1 on matrices, gradient clipping 1.0) over
``tbdiag.param_groups``, a linear warm-up of ``--warmup`` updates and a cosine to lr/10; the TempBalance
methods wrap it with ``TempBalance(per="update", every=--tb-every, warmup=--tb-warmup)``:

    adamw            no TempBalance
    tb-layer         one multiplier per Linear of the blocks, linear map 0.5–1.5 (the paper's)
    tb-block         one multiplier per block (mean alpha of its 4 Linears), 0.5–1.5
    tb-layer-up      per Linear, 1–5: rates only raised (the range of a 2026 layer-wise-LR study)
    tb-block-up      per block, 1–5

For each seed every method starts from the same weights and sees the same batches in the same order
(methods interleaved per seed, so machine load falls on all alike). The score is the final validation loss
over the whole validation split (every non-overlapping window, nats per character). Prints one line per run,
then a table: mean ± std over seeds, each seed, the paired difference to ``adamw``, training time and
TempBalance's share of it; writes every number to ``--out`` (JSON). The defaults (5 methods × 3 seeds)
took 22.5 min (16.6 min of CPU) on the shared 2-core test machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from nanogpt_tempbalance import Options, encode_split, read_text, train  # noqa: E402

METHODS = {  # name: (TempBalance on, unit, min ratio, max ratio)
    "adamw": (False, "layer", 0.5, 1.5),
    "tb-layer": (True, "layer", 0.5, 1.5),
    "tb-block": (True, "block", 0.5, 1.5),
    "tb-layer-up": (True, "layer", 1.0, 5.0),
    "tb-block-up": (True, "block", 1.0, 5.0),
}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="all", help=f"comma-separated from {', '.join(METHODS)}, or all")
    parser.add_argument("--out", default="bench_lm.json", help="JSON of every number")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--tb-every", type=int, default=25)
    parser.add_argument("--tb-warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 because on a CPU shared with other work two "
                             "OpenMP threads spin against it (20× slower measured on the 2-core test machine)")
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; use {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    text, source = read_text(args.data)
    if source != args.data:
        print(f"warning: {args.data} not found, using the {source} (numbers not comparable)")
    train_ids, val_ids, chars = encode_split(text)
    base = Options(data=args.data, steps=args.steps, layers=args.layers, heads=args.heads, width=args.width,
                   block=args.block, batch=args.batch, lr=args.lr, min_lr=args.lr / 10, warmup=args.warmup,
                   tb_every=args.tb_every, tb_warmup=args.tb_warmup, eval_every=args.steps, eval_batches=4,
                   full_val=True, quiet=True)
    print(f"{source}: {len(train_ids):,} training / {len(val_ids):,} validation characters, vocabulary {len(chars)}; "
          f"{args.steps} updates of {args.batch}×{args.block} characters; torch threads {torch.get_num_threads()}",
          flush=True)

    runs: list[dict] = []
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        for method in methods:  # interleaved: every method of a seed under the same machine load
            on, unit, lo, hi = METHODS[method]
            o = replace(base, seed=seed, tempbalance=on, unit=unit, min_ratio=lo, max_ratio=hi)
            t = time.perf_counter()
            r = train(o, text)
            r.update(method=method, seed=seed, wall_s=time.perf_counter() - t, options=asdict(o))
            runs.append(r)
            mult = r["multipliers"]
            spread = (f", multipliers {min(mult.values()):.2f}–{max(mult.values()):.2f}" if mult else "")
            print(f"  seed {seed} {method:12s} val loss {r['val_loss']:.4f} (train {r['final_train_loss']:.4f}), "
                  f"{r['train_s']:.0f} s, TempBalance {r['balance_s']:.2f} s in {r['n_balances']} rebalances{spread}",
                  flush=True)
    total_s = time.perf_counter() - t_all

    n_params = runs[0]["n_params"]
    print(f"\n{args.layers} blocks × width {args.width} ({n_params / 1e6:.2f}M parameters), {args.steps} updates, "
          f"{args.seeds} seeds; validation loss over the whole split (nats/char, lower is better); "
          f"total {total_s / 60:.1f} min")
    print(f"{'method':12s} {'val loss':>16s}  {'per seed':26s} {'Δ vs adamw (paired)':33s} {'train s':>8s} "
          f"{'TB s':>6s} {'TB %':>6s}")
    summary = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        losses = [r["val_loss"] for r in rs]
        m, sd = mean_sd(losses)
        row = {"val_loss_mean": m, "val_loss_std": sd, "val_loss": losses,
               "train_s_mean": statistics.fmean(r["train_s"] for r in rs),
               "balance_s_mean": statistics.fmean(r["balance_s"] for r in rs)}
        row["balance_pct"] = 100 * row["balance_s_mean"] / row["train_s_mean"]
        diff = ""
        if method != "adamw" and "adamw" in methods:
            ref = {r["seed"]: r["val_loss"] for r in runs if r["method"] == "adamw"}
            d = [r["val_loss"] - ref[r["seed"]] for r in rs]
            row["diff_vs_adamw"] = d
            dm, dsd = mean_sd(d)
            diff = f"{dm:+.4f} ± {dsd:.4f} ({sum(x < 0 for x in d)}/{len(d)} better)"
        summary[method] = row
        print(f"{method:12s} {m:.4f} ± {sd:.4f}  {', '.join(f'{x:.4f}' for x in losses):26s} {diff:33s} "
              f"{row['train_s_mean']:8.0f} {row['balance_s_mean']:6.2f} {row['balance_pct']:5.2f}%")
    out = {"benchmark": "bench_lm", "data": source, "n_params": n_params, "total_s": total_s,
           "torch_threads": torch.get_num_threads(), "args": vars(args), "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
