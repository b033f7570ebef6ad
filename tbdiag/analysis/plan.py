"""``--plan``: what an analysis will do, from the checkpoint header alone, and roughly how long it takes.

Layers are planned by `tbdiag.analysis.core.plan_source`, exactly as `analyze` plans them, so the plan covers every
view: a checkpoint's weights, ΔW against a base (both files read), a LoRA adapter's updates (eigenvalues of
the factors' r×r problem) and its merge into the base. Costs are k·`gram_macs`(m, n) (the Gram's lower
triangle, ≈ k·m·n·r·9/16) + k·r³ (eigensolver) per layer, r = min(m, n) — twice with ``randomize``, which
reads and solves each layer again; the seconds come from timing a 4096×1024 Gram and a 1024² eigensolve on
this machine and device, scaled by those counts. FARMS windows are estimated as the full matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tbdiag.analysis.core import plan_source
from tbdiag.esd.layers import LayerSpec
from tbdiag.analysis.options import PRECISIONS, AnalyzeOptions
from tbdiag.esd.spectrum import eigenvalues, eigvalsh_shared, gram, gram_macs, resolve_device


@dataclass(frozen=True)
class PlannedLayer:
    """One layer of the plan."""

    name: str
    kind: str
    shape: tuple[int, ...]
    n_evals: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    """The layers to analyse, in order, with totals."""

    source: str
    format: str
    layers: tuple[PlannedLayer, ...]
    skipped: dict
    device: str
    view: str = "weights"  # `tbdiag.analysis.core.VIEWS`
    base: str | None = None

    @property
    def seconds(self) -> float:
        """Estimated eigen-computation time."""
        return sum(layer.seconds for layer in self.layers)

    @property
    def bytes(self) -> int:
        """Bytes of weights to read."""
        return sum(layer.bytes for layer in self.layers)


def _rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(seconds per Gram multiply-add, seconds per r³ of eigensolve), measured on a 1024-sized problem
    (smaller ones run at lower FLOP rates and overestimate the large layers that dominate big models); the
    eigensolves as `analyze` runs them on CPU, one per thread at a time."""
    n = 1024
    w = torch.randn(1, 4 * n, n)
    eigenvalues(w[:, :256, :128], device, dtype)  # warm up
    t = time.perf_counter()
    for _ in range(3):
        g = gram(w, device, dtype, full=False)  # (1, n, n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    gram_s = (time.perf_counter() - t) / 3 / gram_macs(4 * n, n)
    shared = torch.get_num_threads() if device.type == "cpu" else 1  # eigensolves run one per thread
    stack = g.expand(shared, n, n).contiguous()  # (threads, n, n)
    t = time.perf_counter()
    for _ in range(2):
        eigvalsh_shared([stack])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return gram_s, (time.perf_counter() - t) / 2 / shared / n ** 3


def make_plan(source: str, options: AnalyzeOptions, *, base: str | None = None, view: str | None = None) -> Plan:
    """Plan an analysis (any view, see `tbdiag.analysis.core.analyze`) without reading any weight data beyond what
    the format needs to list tensors."""
    planned = plan_source(source, options, base=base, view=view)
    device = resolve_device(options.device)
    gram_s, eig_s = _rates(device, PRECISIONS[options.precision])
    reads = 2 if planned.view == "delta" and planned.base is not None else 1  # ΔW = W − W_base: two tensors
    passes = 2 if options.randomize else 1  # the randomised twin: read and solved once more
    layers = tuple(_planned(s, gram_s, eig_s, reads, passes) for s in planned.specs)
    return Plan(planned.source, planned.format, layers, planned.skipped, str(device), planned.view, planned.base)


def _planned(spec: LayerSpec, gram_s: float, eig_s: float, reads: int, passes: int) -> PlannedLayer:
    m, n = spec.shape[0], spec.shape[1]
    rank = getattr(getattr(spec, "layer", None), "rank", None)
    if rank is not None:  # a LoRA update: its r×r problem from the factors B (m×r) and A (r×n)
        positions = spec.n_matrices
        seconds = positions * ((m + n) * rank * rank * gram_s + rank ** 3 * eig_s)
        return PlannedLayer(spec.name, spec.kind, spec.shape, spec.n_evals, 4 * (m + n * positions) * rank, seconds)
    r = min(m, n)
    k = spec.n_matrices
    seconds = passes * (k * gram_macs(m, n) * gram_s + k * r ** 3 * eig_s)
    size = spec.ref.dtype.itemsize * k * m * n * reads * passes
    return PlannedLayer(spec.name, spec.kind, spec.shape, spec.n_evals, size, seconds)
