"""Rebuild the bundled sample checkpoints from real (brief) training on MNIST.

    python sample_checkpoints/make_samples.py --mnist ../shared/data/mnist

Writes, next to this script:
  cnn_trained.safetensors          SmallCNN after 2 epochs (flat safetensors)
  cnn_untrained.safetensors        the same SmallCNN at initialisation (the contrast)
  cnn_training_ckpt.pt             the trained CNN as a training checkpoint: weights nested under 'model'
                                   with DataParallel 'module.' prefixes, SGD momentum state, epoch, accuracy
  mlp_sharded/                     MLP after 2 epochs as a sharded safetensors pair + index + config.json
  mlp_legacy.pth                   the trained MLP in PyTorch's legacy (pre-1.6) pickle format, bfloat16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tbdiag.io.checkpoint import order_metadata
from tbdiag.train.idx import load_mnist
from tbdiag.train.models import MLP, SmallCNN

HERE = Path(__file__).resolve().parent


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            idx = perm[start:start + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{type(model).__name__} epoch {epoch}: last loss {loss.item():.3f}")
    return opt


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
    model.train()
    return acc / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", default=str(HERE.parent.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--train-size", type=int, default=20000)
    args = parser.parse_args()
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_mnist(args.mnist)
    n = args.train_size
    x = (torch.tensor(xtr[:n], dtype=torch.float32) / 255 - 0.1307).div(0.3081).unsqueeze(1)  # (n, 1, 28, 28)
    y = torch.tensor(ytr[:n], dtype=torch.long)
    xt = (torch.tensor(xte, dtype=torch.float32) / 255 - 0.1307).div(0.3081).unsqueeze(1)
    yt = torch.tensor(yte, dtype=torch.long)

    cnn = SmallCNN()
    order = order_metadata(list(cnn.state_dict()))  # safetensors sorts tensors; keep the model order
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, HERE / "cnn_untrained.safetensors",
              metadata=order)
    opt = train(cnn, x, y, epochs=2, lr=0.05)
    acc = accuracy(cnn, xt, yt)
    print(f"cnn test accuracy {acc:.4f}")
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, HERE / "cnn_trained.safetensors",
              metadata={"test_accuracy": f"{acc:.4f}", **order})
    wrapped = {f"module.{k}": v for k, v in cnn.state_dict().items()}
    torch.save({"epoch": 2, "model": wrapped, "optimizer": opt.state_dict(), "best_acc": acc},
               HERE / "cnn_training_ckpt.pt")

    mlp = MLP()
    train(mlp, x, y, epochs=2, lr=0.05)
    print(f"mlp test accuracy {accuracy(mlp, xt, yt):.4f}")
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    folder = HERE / "mlp_sharded"
    folder.mkdir(exist_ok=True)
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / fname)
        weight_map.update({k: fname for k in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "tbdiag-mlp", "hidden": [128, 128]}) + "\n")
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, HERE / "mlp_legacy.pth",
               _use_new_zipfile_serialization=False)


if __name__ == "__main__":
    main()
