"""Global learning-rate schedules as pure functions of the epoch (multipliers of the initial lr)."""

from __future__ import annotations

import math

from tbdiag.errors import TbdiagError


def cosine(epoch: int, total: int) -> float:
    """Cosine annealing (CAL): ½(1 + cos(π·epoch/total)), constant after ``total`` epochs (``total`` ≥ 1)."""
    return 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))


def warm_restarts(epoch: int, period: int = 10, mult: int = 2) -> float:
    """SGDR: cosine annealing restarted after ``period`` epochs, each period ``mult`` times the last.

    Raises:
        TbdiagError: a period below 1 or a multiplier below 1 (the restarts would never advance).
    """
    if period < 1 or mult < 1:
        raise TbdiagError(f"SGDR period {period}, multiplier {mult}: the restarts would not advance; "
                          "use a period and a multiplier ≥ 1")
    start, length = 0, period
    while epoch >= start + length:
        start, length = start + length, length * mult
    return 0.5 * (1 + math.cos(math.pi * (epoch - start) / length))
