"""Eigenvalues of WᵀW for a stack of same-shaped matrices, on a chosen device.

The eigenvalues of WᵀW are the squared singular values of W. They come fastest from ``eigvalsh`` of the
smaller Gram matrix (WᵀW or WWᵀ, which share their non-zero eigenvalues), batched over the stack;
``benchmarks/bench_analyze.py`` measures this against ``svdvals``. The Gram matrix is formed in float64 by
default, which keeps the upper half of the spectrum within 1e-10 relative of float64 ``svdvals``.
"""

from __future__ import annotations

import torch

from tbdiag.errors import TbdiagError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable device.

    Raises:
        TbdiagError: the device is unknown or not present on this machine.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TbdiagError(f"--device {spec}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise TbdiagError(f"--device {spec}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise TbdiagError(f"--device {spec}: no CUDA GPU is available here; use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TbdiagError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s); "
                          f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return device


def eigenvalues(matrices: torch.Tensor, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Pooled, ascending eigenvalues of WᵀW over a stack of matrices.

    Args:
        matrices: ``(k, m, n)`` stack of matrices (any float dtype; upcast here, one stack at a time).
        device: where to compute.
        dtype: compute precision of the Gram matrix and the eigensolver.

    Returns:
        ``(k·min(m, n),)`` eigenvalues in ascending order, on ``device``, clamped at zero; all ``nan`` when
        the matrices hold a non-finite value (the eigensolver cannot run on them).
    """
    w = matrices.to(device=device, dtype=dtype)  # (k, m, n)
    if not bool(torch.isfinite(w).all()):
        return torch.full((w.shape[0] * min(w.shape[1], w.shape[2]),), torch.nan, device=device, dtype=dtype)
    gram = w.mT @ w if w.shape[1] >= w.shape[2] else w @ w.mT  # (k, r, r), r = min(m, n)
    evals = torch.linalg.eigvalsh(gram)  # (k, r)
    return evals.flatten().clamp_min(0).sort().values  # (k·r,)


def eigenvalues_svd(matrices: torch.Tensor, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same eigenvalues from ``svdvals`` (slower; the reference for accuracy checks)."""
    s = torch.linalg.svdvals(matrices.to(device=device, dtype=dtype))  # (k, r)
    return s.square().flatten().sort().values
