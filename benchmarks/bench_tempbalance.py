"""TempBalance benchmarks: (a) its overhead per epoch, (b) accuracy of ``cal`` vs ``tb`` on real data.

    python benchmarks/bench_tempbalance.py overhead [--steps 20]
    python benchmarks/bench_tempbalance.py accuracy --mnist ../shared/data/mnist [--seeds 5 --epochs 15]

(a) ResNet18 at CIFAR size (32×32×3, 10 classes, batch 128, 391 steps an epoch). A full CPU epoch takes
    long here, so it times ``--steps`` SGD steps and scales to 391 (printed as an estimate), and times
    TempBalance's per-epoch work (an ESD + fit of every tuned layer and the group update) directly, and
    the HTML report of every layer's spectrum that ``train --report`` redraws each epoch.
(b) The small CNN on a harder MNIST task (the first ``--train-size`` training images, full test set) with
    the paper's setup (SGD 0.9, wd 5e-4, cosine annealing), ``cal`` and ``tb`` for each seed, through
    ``tbdiag.train.loop.train``. Prints mean ± std of the final test accuracy per method.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tbdiag.tempbalance import TempBalance
from tbdiag.train.loop import train
from tbdiag.train.models import MODELS
from tbdiag.runs.config import TrainConfig


def overhead(steps: int) -> None:
    torch.manual_seed(0)
    model = MODELS["resnet18"](num_classes=10)
    tb = TempBalance(model, lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=5e-4), device="cpu")
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    step_times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        tb.optimizer.zero_grad()
        loss.backward()
        tb.optimizer.step()
        if i >= 2:  # the first steps warm up allocators
            step_times.append(time.perf_counter() - t)
    balance_times = []
    for _ in range(3):
        t = time.perf_counter()
        tb.step()
        balance_times.append(time.perf_counter() - t)
    step = statistics.median(step_times)
    epoch = step * 391
    bal = statistics.median(balance_times)
    print(f"ResNet18 CIFAR-size, {len(tb.layers)} tuned layers, torch threads {torch.get_num_threads()}")
    print(f"  training step (batch 128), median of {steps}: {step * 1000:.0f} ms → epoch (391 steps) ≈ {epoch:.0f} s (estimate)")
    print(f"  TempBalance per epoch (ESD + fit + group update), median of 3: {bal * 1000:.0f} ms")
    print(f"  overhead ratio: {bal / epoch:.5f} ({100 * bal / epoch:.3f}% of an epoch)")
    from tbdiag.analysis.core import analyze
    from tbdiag.report.render import checkpoint_report

    checkpoint_report(analyze(model, keep_spectra=True, device="cpu"))  # imports matplotlib/jinja2 once
    t = time.perf_counter()
    html = checkpoint_report(analyze(model, keep_spectra=True, device="cpu"))
    rep = time.perf_counter() - t
    print(f"  live report (analysis + {len(html) // 1000} KB HTML with every layer's ESD): {rep:.2f} s = "
          f"{rep / epoch:.5f} of an epoch")


def accuracy(mnist: str, seeds: int, epochs: int, train_size: int, model: str, width: float) -> None:
    results: dict[str, list[float]] = {"cal": [], "tb": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for method in ("cal", "tb"):  # interleaved, so machine noise hits both alike
                config = TrainConfig(model=model, data="mnist", data_dir=mnist, method=method, epochs=epochs,
                                     seed=seed, train_subset=train_size, width=width)
                out = Path(tmp) / f"{method}-{seed}"
                t = time.perf_counter()
                history = train(config, out, device="cpu")
                results[method].append(history[-1]["test_acc"])
                print(f"  seed {seed} {method:3s}: test accuracy {history[-1]['test_acc']:.4f} "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"{model} (width {width:g}) on MNIST, first {train_size} training images, {epochs} epochs, {seeds} seeds:")
    for method, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"  {method:3s}: {100 * statistics.fmean(accs):.2f} ± {100 * sd:.2f} %  ({', '.join(f'{a:.4f}' for a in accs)})")
    diffs = [b - a for a, b in zip(results["cal"], results["tb"])]
    print(f"  tb − cal per seed: {', '.join(f'{100 * d:+.2f}' for d in diffs)} points; "
          f"mean {100 * statistics.fmean(diffs):+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--steps", type=int, default=20)
    a = sub.add_parser("accuracy")
    a.add_argument("--mnist", default="../shared/data/mnist")
    a.add_argument("--seeds", type=int, default=5)
    a.add_argument("--epochs", type=int, default=15)
    a.add_argument("--train-size", type=int, default=5000)
    a.add_argument("--model", default="cnn")
    a.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args()
    if args.what == "overhead":
        overhead(args.steps)
    else:
        accuracy(args.mnist, args.seeds, args.epochs, args.train_size, args.model, args.width)


if __name__ == "__main__":
    main()
