"""Sharing layer work across torch.distributed ranks: largest cost first, results gathered everywhere."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: largest cost first, each to the least loaded rank (ties: lowest rank)."""
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def gather_items(local: dict[int, Any]) -> dict[int, Any]:
    """Union over ranks of ``{item index: result}`` dicts (every rank gets all of them)."""
    _, size = world()
    if size == 1:
        return dict(local)
    parts: list[dict[int, Any] | None] = [None] * size
    dist.all_gather_object(parts, local)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part or {})
    return merged
