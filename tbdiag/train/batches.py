"""What each training step sees: this rank's share of a seeded shuffle, the (optionally stratified) training
set, and the standard CIFAR augmentation."""

from __future__ import annotations

import torch
from torch import nn

from tbdiag.runs.config import ConfigError, TrainConfig
from tbdiag.train.data import Dataset, stratified_subset


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the 4-pixel zero-padded image and random horizontal flip."""
    b, _, h, w = x.shape  # (B, C, H, W)
    padded = nn.functional.pad(x, (4, 4, 4, 4))  # (B, C, H+8, W+8)
    oy, ox = torch.randint(0, 9, (b,), generator=g), torch.randint(0, 9, (b,), generator=g)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def rank_order(n: int, g: torch.Generator, rank: int, size: int) -> torch.Tensor:
    """This rank's share of a seeded shuffle of ``n`` images: every rank gets ⌈n / size⌉ of them.

    When ``n`` does not split evenly the shuffle is padded by wrapping around (as torch's
    ``DistributedSampler`` does): its first few images (at most size − 1) are seen twice in that epoch, so
    that every rank runs the same number of steps; otherwise DDP's collectives would deadlock.
    """
    perm = torch.randperm(n, generator=g)
    total = -(-n // size) * size
    if total > n:
        perm = perm.repeat(-(-total // n))[:total]
    return perm[rank::size]


def training_set(data: Dataset, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels, or the seeded class-stratified sample ``train_subset`` asks for.

    Raises:
        ConfigError: a subset larger than the training set.
    """
    n = config.train_subset
    if not n or n == len(data.y_train):
        return data.x_train, data.y_train
    if n > len(data.y_train):
        raise ConfigError("train_subset", n, f"the training set has only {len(data.y_train)} images; "
                                             "ask for at most that many (0: all of them)")
    idx = stratified_subset(data.y_train, n, config.seed)
    return data.x_train[idx], data.y_train[idx]
