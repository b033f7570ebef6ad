"""Sharing layer work across torch.distributed ranks: largest cost first, results gathered everywhere."""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner (rank, or thread) of each item: largest cost first, each to the least loaded (ties: lowest)."""
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


@contextmanager
def process_group(backend: str = "gloo") -> Iterator[int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and leave it on exit; yields the rank.

    Leaving matters: a process that exits with the group still up aborts in gloo's destructor.
    ``TBDIAG_TIMEOUT_MIN`` (default 60) bounds how long a rank waits for the others.
    """
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("TBDIAG_TIMEOUT_MIN", "60"))))
        created = True
    try:
        yield world()[0]
    finally:
        if created:
            dist.destroy_process_group()
