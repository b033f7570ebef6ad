"""TempBalance in a plain PyTorch loop: a 4-layer MLP on MNIST with AdamW and warm-up + cosine.

    python examples/tempbalance_in_your_loop.py --mnist ../shared/data/mnist [--epochs 3] [--train-size 20000]

Prints, per epoch, the test accuracy and each tuned layer's alpha and effective learning rate. Without
the MNIST folder it runs on seeded random images (a smoke run: accuracy means nothing there).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import tbdiag
from tbdiag import TempBalance
from tbdiag.train.idx import load_mnist


def data(folder: str, n: int) -> tuple[torch.Tensor, ...]:
    """MNIST (first ``n`` training images, all test images) as flat floats in [0, 1], or random stand-ins."""
    try:
        xtr, ytr, xte, yte = load_mnist(folder)
    except Exception:  # noqa: BLE001 - any missing or unreadable folder: the smoke data below
        g = torch.Generator().manual_seed(0)
        xtr, xte = torch.randint(0, 256, (n, 28, 28), generator=g), torch.randint(0, 256, (500, 28, 28), generator=g)
        ytr, yte = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (500,), generator=g)
    x = torch.as_tensor(xtr[:n], dtype=torch.float32).flatten(1) / 255  # (n, 784)
    y = torch.as_tensor(ytr[:n], dtype=torch.long)
    return x, y, torch.as_tensor(xte, dtype=torch.float32).flatten(1) / 255, torch.as_tensor(yte, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=20000)
    args = parser.parse_args()
    x, y, xt, yt = data(args.mnist, args.train_size)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.AdamW(tbdiag.param_groups(model, weight_decay=0.01), lr=1e-3)  # no decay on biases
    tb = TempBalance(model, opt)  # splits the two groups by layer: fc / fc:no_decay
    steps_per_epoch = len(x) // 128
    warmup = torch.optim.lr_scheduler.LinearLR(tb.optimizer, start_factor=0.1, total_iters=steps_per_epoch)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(tb.optimizer, T_max=max(1, steps_per_epoch * (args.epochs - 1)))
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
        tb.step(epoch + 1)  # per epoch: refit alphas, remap multipliers
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        lrs = tb.effective_lrs()
        layers = ", ".join(f"{t.name}: alpha {tb.values[t.name]:.2f} lr {lrs[t.unit]:.2e}" for t in tb.layers)
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} | {layers}")


if __name__ == "__main__":
    main()
