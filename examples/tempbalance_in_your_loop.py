"""TempBalance in a plain PyTorch loop: a 4-layer MLP on MNIST with AdamW and warm-up + cosine.

    python examples/tempbalance_in_your_loop.py --mnist ../shared/data/mnist [--epochs 3]

Prints, per epoch, the test accuracy and each tuned layer's alpha and effective learning rate.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from tbdiag import TempBalance
from tbdiag.train.idx import load_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    xtr, ytr, xte, yte = load_mnist(args.mnist)
    x = torch.tensor(xtr[:20000], dtype=torch.float32).flatten(1) / 255  # (n, 784)
    y = torch.tensor(ytr[:20000], dtype=torch.long)
    xt, yt = torch.tensor(xte, dtype=torch.float32).flatten(1) / 255, torch.tensor(yte, dtype=torch.long)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    tb = TempBalance(model, lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01))
    steps_per_epoch = len(x) // 128
    warmup = torch.optim.lr_scheduler.LinearLR(tb.optimizer, start_factor=0.1, total_iters=steps_per_epoch)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(tb.optimizer, T_max=steps_per_epoch * (args.epochs - 1))
    schedule = torch.optim.lr_scheduler.SequentialLR(tb.optimizer, [warmup, cosine], milestones=[steps_per_epoch])
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x))
        for i in range(steps_per_epoch):
            idx = perm[i * 128:(i + 1) * 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            tb.optimizer.zero_grad()
            loss.backward()
            tb.optimizer.step()  # each group steps at base lr × its lr_scale
            schedule.step()  # per step: the base schedule does not know about TempBalance
        tb.step()  # per epoch: refit alphas, remap multipliers
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        lrs = tb.effective_lrs()
        layers = ", ".join(f"{t.name}: alpha {tb.values[t.name]:.2f} lr {lrs[t.unit]:.2e}" for t in tb.layers)
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} | {layers}")


if __name__ == "__main__":
    main()
