"""The training run folder: ``config.json``, ``metrics.jsonl`` and atomic, resumable checkpoints.

    DIR/config.json                   the TrainConfig
    DIR/metrics.jsonl                 one line per completed epoch (rewritten from the checkpoint's history)
    DIR/checkpoints/epoch-0005.safetensors  weights after epoch 5
    DIR/checkpoints/epoch-0005.state.pt     optimizer, scheduler, TempBalance, SNR, RNG state and history
    DIR/checkpoints/last.json         names the newest complete pair; written last, atomically
    DIR/checkpoints/best.safetensors  weights of the best test accuracy so far

A kill at any moment leaves ``last.json`` naming a complete pair: the new pair is fully written before
the pointer moves, and older pairs are deleted only after it has.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tbdiag.checkpoint import order_metadata
from tbdiag.errors import TbdiagError
from tbdiag.export import atomic_save, atomic_write


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's numbers (written to ``config.json``)."""

    model: str = "resnet18"
    data: str = "cifar10"
    data_dir: str | None = None
    method: str = "tb"
    epochs: int = 200
    lr: float | None = None  # None: the paper's default for the model (0.1 ResNet, 0.05 VGG and others)
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    width: float = 1.0
    tb_map: str = "linear"
    tb_min_ratio: float | None = None  # None: 0.5 (tb) or 0.6 (tb+snr)
    tb_max_ratio: float | None = None  # None: 1.5 (tb) or 1.4 (tb+snr)
    tb_every: int = 1
    tb_fit: str = "median"
    tb_metric: str = "alpha"
    snr_strength: float = 0.01
    sgdr_period: int = 10
    sgdr_mult: int = 2
    synthetic_size: int = 512
    train_subset: int = 0  # use only the first N training images (0: all)
    init_from: str | None = None
    multipliers: str | None = None

    def resolved_lr(self) -> float:
        """The initial learning rate."""
        return self.lr if self.lr is not None else (0.1 if self.model.startswith("resnet") else 0.05)

    def ratios(self) -> tuple[float, float]:
        """TempBalance's multiplier range."""
        lo, hi = (0.6, 1.4) if self.method == "tb+snr" else (0.5, 1.5)
        return (self.tb_min_ratio if self.tb_min_ratio is not None else lo,
                self.tb_max_ratio if self.tb_max_ratio is not None else hi)


def read_config(folder: Path) -> TrainConfig:
    """The config of an existing run folder.

    Raises:
        TbdiagError: no run there, or a config this version cannot read.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise TbdiagError(f"{folder}: not a training run (no config.json); pass the --out folder of a run")
    try:
        raw = json.loads(path.read_text())
        return TrainConfig(**raw)
    except (ValueError, TypeError) as exc:
        raise TbdiagError(f"{path}: unreadable run config ({exc}); start a new run with --out") from exc


def write_config(folder: Path, config: TrainConfig) -> None:
    """Create the run folder and write its config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints").mkdir(exist_ok=True)
    atomic_write(folder / "config.json", json.dumps(dataclasses.asdict(config), indent=1) + "\n")


def save_checkpoint(folder: Path, epoch: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the epoch's weights and state, move ``last.json`` to them, then drop older pairs."""
    ck = folder / "checkpoints"
    stem = f"epoch-{epoch:04d}"
    atomic_save(ck / f"{stem}.safetensors", lambda p: save_file(weights, p, metadata=order_metadata(list(weights))))
    atomic_save(ck / f"{stem}.state.pt", lambda p: torch.save(state, p))
    atomic_write(ck / "last.json", json.dumps({"epoch": epoch, "weights": f"{stem}.safetensors",
                                                "state": f"{stem}.state.pt"}) + "\n")
    for old in ck.glob("epoch-*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)


def save_best(folder: Path, weights: dict[str, torch.Tensor], record: dict) -> None:
    """Keep the weights of the best epoch so far."""
    ck = folder / "checkpoints"
    meta = {"epoch": str(record["epoch"]), **order_metadata(list(weights))}
    atomic_save(ck / "best.safetensors", lambda p: save_file(weights, p, metadata=meta))
    atomic_write(ck / "best.json", json.dumps(record) + "\n")


def load_last(folder: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(epoch, weights, state) of the newest complete checkpoint, or None before the first epoch ends."""
    pointer = folder / "checkpoints" / "last.json"
    if not pointer.is_file():
        return None
    last = json.loads(pointer.read_text())
    weights = load_file(folder / "checkpoints" / last["weights"])
    state = torch.load(folder / "checkpoints" / last["state"], weights_only=True)
    return int(last["epoch"]), weights, state


def write_metrics(folder: Path, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` from the history of completed epochs."""
    atomic_write(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
