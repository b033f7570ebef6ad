"""The training loop: CAL, TempBalance, SNR, TB+SNR and SGDR; resumable; DistributedDataParallel under torchrun.

Determinism: the model is initialised from ``seed``; each epoch's shuffle and augmentation come from a
generator seeded by (seed, epoch); so a run resumed from a checkpoint repeats exactly what an
uninterrupted run does (on CPU). The run folder's format is `tbdiag.runs.folder`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tbdiag.io.checkpoint import open_checkpoint
from tbdiag.analysis.distributed import process_group, world
from tbdiag.errors import TbdiagError
from tbdiag.io.outputs import atomic_write
from tbdiag.runs.config import CHOICES, ConfigError, TrainConfig
from tbdiag.runs.folder import (SavedEpoch, load_last, read_config, save_best, save_checkpoint, write_config, write_metrics,
                              write_pointer)
from tbdiag.esd.spectrum import resolve_device
from tbdiag.tempbalance import TempBalance
from tbdiag.allocation.recommend import load_multipliers
from tbdiag.train.batches import augment, rank_order, training_set
from tbdiag.train.data import Dataset, load_dataset
from tbdiag.train.models import MODELS, NARROWEST
from tbdiag.train.schedules import cosine, warm_restarts
from tbdiag.train.snr import SpectralNormRegularizer

log = logging.getLogger(__name__)

METHODS = CHOICES["method"]
OnBatch = Callable[[int, int, int], None]  # (epoch, batch index, number of batches)


def check_config(config: TrainConfig) -> None:
    """What `TrainConfig` cannot check alone: the width must leave every layer of the model a channel.

    Raises:
        ConfigError: a width that rounds a layer down to no channel.
    """
    if int(NARROWEST[config.model] * config.width) < 1:
        raise ConfigError("width", config.width, f"leaves the narrowest layer of {config.model} no channel; "
                                                 f"use a width ≥ {1 / NARROWEST[config.model]:g}")


def build_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """The model for the data's image shape and classes, initialised from the seed."""
    c, h, w = data.shape
    torch.manual_seed(config.seed)
    if config.model == "mlp":
        return MODELS["mlp"](in_features=c * h * w, num_classes=data.num_classes, width=config.width)
    if config.model.startswith("vgg") and (h, w) != (32, 32):
        raise TbdiagError(f"model {config.model}: needs 32×32 images, {config.data} has {h}×{w}; "
                          "use resnet18, cnn or mlp")
    return MODELS[config.model](in_channels=c, num_classes=data.num_classes, width=config.width)


def load_init(model: nn.Module, path: str) -> None:
    """Copy weights from any checkpoint ``analyze`` reads; names must match exactly."""
    refs = {t.name: t for t in open_checkpoint(path).tensors}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(refs)), sorted(set(refs) - set(own))
    if missing or unexpected:
        raise TbdiagError(f"{path}: names do not match the model (missing: {', '.join(missing[:3]) or '-'}; "
                          f"unexpected: {', '.join(unexpected[:3]) or '-'}); start from a checkpoint of the same "
                          "model and width")
    for name, tensor in own.items():
        if tuple(refs[name].shape) != tuple(tensor.shape):
            raise TbdiagError(f"{path}: {name} has shape {tuple(refs[name].shape)}, the model {tuple(tensor.shape)}; "
                              "start from a checkpoint of the same model and width")
        tensor.copy_(refs[name].load())


def weight_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, for comparing ranks."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Parts:
    """What one training run is made of (the objects inside change as it trains)."""

    data: Dataset
    x_train: torch.Tensor  # (N, C, H, W) uint8: the training images (or the subset)
    y_train: torch.Tensor  # (N,) int64
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tb: TempBalance | None
    snr: SpectralNormRegularizer | None
    norm: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> normalised floats on the device


def train(config: TrainConfig, out: Path, *, device: str = "auto", resume: bool = False,
          on_batch: OnBatch | None = None, report: Path | None = None) -> list[dict]:
    """Train (or continue) the run in ``out``; returns the per-epoch records.

    Under torchrun (WORLD_SIZE > 1) the processes form a group (gloo on CPU, nccl on CUDA) and train with
    DistributedDataParallel, every rank the same number of steps (see `rank_order`). A new run's folder
    (which must not exist, or be empty) is created with its ``config.json`` only once everything is
    validated and built, just before the first epoch, so a bad configuration leaves nothing behind. A
    resumed run continues from its newest readable checkpoint and may be extended, not shortened. With
    ``report``, rank 0 rewrites that HTML run report (atomically) after every epoch.

    Raises:
        TbdiagError: bad configuration, data, initial checkpoint or multipliers, a folder that holds
            something else, or a resume that would shorten the run (all before any training or writing).
    """
    check_config(config)
    if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TbdiagError(f"{out}: exists and is not an empty folder; train into a new folder")
    dev = resolve_device(device)
    with process_group("nccl" if dev.type == "cuda" else "gloo"):
        return _train(config, out, dev, resume, on_batch, report)


def _train(config: TrainConfig, out: Path, dev: torch.device, resume: bool, on_batch: OnBatch | None,
           report: Path | None) -> list[dict]:
    rank, size = world()
    if dev.type == "cuda" and size > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    saved = load_last(out) if resume else None
    if saved is not None and config.epochs < saved.epoch:
        raise TbdiagError(f"{out}: the run has completed {saved.epoch} epochs, more than the {config.epochs} asked "
                          f"for; ask for at least {saved.epoch} epochs (a run is extended, never shortened)")
    parts = _build(config, dev, resumed=saved is not None)
    history = _restore(parts, saved) if saved is not None else []
    if saved is not None:
        log.info("resuming %s after epoch %d", out, saved.epoch)
    net = nn.parallel.DistributedDataParallel(parts.model) if size > 1 else parts.model
    if rank == 0 and (not resume or read_config(out) != config):  # a resume may extend the epochs
        write_config(out, config)
    if rank == 0 and saved is not None and not saved.pointer_ok:
        write_pointer(out, saved.epoch)
    best = max((r["test_acc"] for r in history), default=-1.0)
    for epoch in range(saved.epoch if saved else 0, config.epochs):
        record = _epoch(parts, net, config, epoch, on_batch, dev)
        history.append(record)
        log.info("epoch %d/%d: train loss %.4f acc %.4f, test loss %.4f acc %.4f, lr %.4g", epoch + 1, config.epochs,
                 record["train_loss"], record["train_acc"], record["test_loss"], record["test_acc"], record["lr"])
        if rank == 0:
            _save(parts, out, history, best, report)
            best = max(best, record["test_acc"])
    if size > 1:
        report_ranks(parts.model, parts.tb, out, rank, size)
    return history


def _build(config: TrainConfig, dev: torch.device, resumed: bool) -> Parts:
    """Data, model (with ``init_from``), optimizer, TempBalance, scheduler and SNR of a run."""
    shape = (1, 28, 28) if config.model in ("mlp", "cnn") else (3, 32, 32)
    data = load_dataset(config.data, config.data_dir, image_shape=shape, synthetic_size=config.synthetic_size,
                        seed=config.seed)
    x_train, y_train = training_set(data, config)
    model = build_model(config, data)
    if config.init_from:
        load_init(model, config.init_from)
    model.to(dev)
    sgd = dict(lr=config.resolved_lr(), momentum=config.momentum, weight_decay=config.weight_decay)
    tb = None
    initial = load_multipliers(config.multipliers) if config.multipliers else None
    if config.method in ("tb", "tb+snr") or initial is not None:
        if resumed and initial is None:
            initial = {}  # the checkpoint's TempBalance state replaces the first balance: skip computing it
        lo, hi = config.ratios()
        tb = TempBalance(model, lambda groups: torch.optim.SGD(groups, **sgd), map=config.tb_map, min_ratio=lo,
                         max_ratio=hi, metric=config.tb_metric, fit=config.tb_fit, device=str(dev), initial=initial,
                         every=config.tb_every if config.method in ("tb", "tb+snr") else 0,
                         no_decay=False)  # weight decay on every parameter, as the paper's (and CAL's) SGD
        optimizer = tb.optimizer
    else:
        optimizer = torch.optim.SGD(model.parameters(), **sgd)
    if config.method == "sgdr":
        factor = lambda e: warm_restarts(e, config.sgdr_period, config.sgdr_mult)  # noqa: E731
    else:
        factor = lambda e: cosine(e, config.epochs)  # noqa: E731
    snr = SpectralNormRegularizer(model, config.snr_strength, config.seed) if "snr" in config.method else None
    mean = x_train.float().mean(dim=(0, 2, 3), keepdim=True)[0] / 255  # (C, 1, 1)
    std = x_train.float().std(dim=(0, 2, 3), keepdim=True)[0].clamp_min(1e-3) / 255
    return Parts(data, x_train, y_train, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), tb,
                 snr, lambda x: ((x.float() / 255 - mean) / std).to(dev))


def _restore(parts: Parts, saved: SavedEpoch) -> list[dict]:
    """Load a checkpoint into the run's objects; returns the history of its completed epochs."""
    parts.model.load_state_dict(saved.weights)
    parts.optimizer.load_state_dict(saved.state["optimizer"])
    parts.scheduler.load_state_dict(saved.state["scheduler"])
    schedule = parts.scheduler  # the rate of the next epoch from this run's schedule (--epochs may have grown)
    for group, base, factor in zip(parts.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)
    if parts.tb is not None:
        parts.tb.load_state_dict(saved.state["tempbalance"])
    if parts.snr is not None:
        parts.snr.load_state_dict(saved.state["snr"])
    torch.set_rng_state(saved.state["rng"])
    return list(json.loads(saved.state["history"]))


def _epoch(parts: Parts, net: nn.Module, config: TrainConfig, epoch: int, on_batch: OnBatch | None,
           dev: torch.device) -> dict:
    """Train one epoch (this rank's share), step the schedule and TempBalance, test; returns its record."""
    rank, size = world()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = rank_order(len(parts.x_train), g, rank, size)
    tb, optimizer = parts.tb, parts.optimizer
    base_lr = optimizer.param_groups[0]["lr"]
    layer_lrs = {t.name: base_lr * tb.multipliers[t.unit] for t in tb.layers} if tb is not None else {}
    alphas = dict(tb.values) if tb is not None else {}
    net.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    n_batches = (len(order) + config.batch_size - 1) // config.batch_size
    for b in range(n_batches):
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        x = parts.x_train[idx]
        if parts.data.augment:
            x = augment(x, g)
        x, y = parts.norm(x), parts.y_train[idx].to(dev)
        logits = net(x)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if parts.snr is not None:
            parts.snr.apply()
        optimizer.step()
        sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
        if on_batch is not None:
            on_batch(epoch, b, n_batches)
    if size > 1:
        dist.all_reduce(sums)
    parts.scheduler.step()
    t_tb = time.perf_counter()
    if tb is not None:
        tb.step()
    t_tb = time.perf_counter() - t_tb
    test_loss, test_acc = evaluate(parts.model, parts.data, parts.norm, dev)
    return {"epoch": epoch + 1, "train_loss": sums[0].item() / sums[2].item(), "train_acc": sums[1].item() / sums[2].item(),
            "test_loss": test_loss, "test_acc": test_acc, "lr": base_lr,
            "layers": {n: {"alpha": alphas.get(n), "lr": lr} for n, lr in layer_lrs.items()},
            "time_s": time.perf_counter() - t0, "tempbalance_s": t_tb}


def _save(parts: Parts, out: Path, history: list[dict], best: float, report: Path | None) -> None:
    """Rank 0, after an epoch: checkpoint, metrics, best weights, and the live report."""
    record = history[-1]
    weights = {k: v.detach().cpu().contiguous() for k, v in parts.model.state_dict().items()}
    state = {"optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
             "tempbalance": parts.tb.state_dict() if parts.tb is not None else None,
             "snr": parts.snr.state_dict() if parts.snr is not None else None, "rng": torch.get_rng_state(),
             "history": json.dumps(history)}
    save_checkpoint(out, record["epoch"], weights, state)
    write_metrics(out, history)
    if record["test_acc"] > best:
        save_best(out, weights, record)
    if report is not None:
        from tbdiag.report.render import write_report

        t_report = time.perf_counter()
        write_report([str(out)], report)
        log.info("report %s rewritten in %.2f s (epoch took %.2f s)", report, time.perf_counter() - t_report,
                 record["time_s"])


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, norm: Callable, dev: torch.device) -> tuple[float, float]:
    """Test loss and accuracy over the whole test set."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(data.x_test), 1000):
        logits = model(norm(data.x_test[i:i + 1000]))
        y = data.y_test[i:i + 1000].to(dev)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(data.x_test), correct / len(data.x_test)


def report_ranks(model: nn.Module, tb: TempBalance | None, out: Path, rank: int, size: int) -> None:
    """Rank 0 writes every rank's weight digest and multipliers to ``ranks.json`` (they must agree)."""
    mine = {"rank": rank, "weights_sha256": weight_digest(model), "multipliers": tb.multipliers if tb else {}}
    parts: list = [None] * size
    dist.all_gather_object(parts, mine)
    if rank == 0:
        atomic_write(out / "ranks.json", json.dumps(parts, indent=1) + "\n")
