"""Global learning-rate schedules as pure functions of the epoch (multipliers of the initial lr)."""

from __future__ import annotations

import math


def cosine(epoch: int, total: int) -> float:
    """Cosine annealing (CAL): ½(1 + cos(π·epoch/total))."""
    return 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))


def warm_restarts(epoch: int, period: int = 10, mult: int = 2) -> float:
    """SGDR: cosine annealing restarted after ``period`` epochs, each period ``mult`` times the last."""
    start, length = 0, period
    while epoch >= start + length:
        start, length = start + length, length * mult
    return 0.5 * (1 + math.cos(math.pi * (epoch - start) / length))
