"""Eigenvalues of WᵀW for a stack of same-shaped matrices, on a chosen device.

The eigenvalues of WᵀW are the squared singular values of W. They come fastest from ``eigvalsh`` of the
smaller Gram matrix (WᵀW or WWᵀ, which share their non-zero eigenvalues), batched over the stack in
batches sized to the memory at hand and, on CPU, shared out over the threads (`eigvalsh_shared`);
``benchmarks/bench_analyze.py`` measures this against ``svdvals``.
The Gram matrix is accumulated in float64 by default, block by block, which keeps the upper half of the
spectrum within 1e-10 relative of float64 ``svdvals`` and memory at the weight's own bytes plus one
block and the r×r results of one batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from tbdiag.analysis.distributed import assign_by_cost
from tbdiag.errors import TbdiagError

CHUNK_ELEMENTS = 1 << 22  # entries of one upcast block in `gram` (32 MB in float64)
BATCH_BYTES = 1 << 30  # Gram matrices (and eigensolver workspace) of one CPU eigensolve batch
PARALLEL_MIN_WORK = 1 << 25  # k·r³ below which a stack's eigensolves are not worth handing to threads


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
        raise TbdiagError(f"device {spec}: not a device; use auto, cpu, cuda or cuda:N", cli={"device ": "--device "}) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise TbdiagError(f"device {spec}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N", cli={"device ": "--device "})
    if not torch.cuda.is_available():
        raise TbdiagError(f"device {spec}: no CUDA GPU is available here; use device cpu or auto", cli={"device ": "--device "})
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TbdiagError(f"device {spec}: this machine has {torch.cuda.device_count()} GPU(s); "
                          f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}", cli={"device ": "--device "})
    return device


def block_elements(device: torch.device, dtype: torch.dtype) -> int:
    """Entries of one upcast block in `gram`: `CHUNK_ELEMENTS` on CPU, a quarter of the free memory on CUDA."""
    if device.type != "cuda":
        return CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    return max(CHUNK_ELEMENTS, free // 4 // dtype.itemsize)


def gram(matrices: torch.Tensor, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
         chunk_elements: int | None = None, full: bool = True) -> torch.Tensor:
    """The smaller Gram matrix of each matrix of a stack, accumulated over row blocks.

    Only one block of rows (``chunk_elements`` entries, default `block_elements`) is upcast at a time, so
    a bf16 matrix of any size needs its own bytes, one float64 block and the r×r result — never a full
    float64 copy. Only the lower triangle is multiplied out, in column panels (`gram_macs`: ≈ 9/16 of the
    full product's work; 1.1–1.4× faster on CPU, ``benchmarks/bench_spectrum.py``); ``full`` mirrors it up.

    Args:
        matrices: ``(k, m, n)`` stack, any float dtype, on any device.
        full: fill both triangles; with ``False`` only the lower one is complete (enough for ``eigvalsh``,
            which reads only that one).

    Returns:
        ``(k, r, r)`` with r = min(m, n): WᵀW when m ≥ n, else WWᵀ.
    """
    device = torch.device(device)
    chunk_elements = chunk_elements or block_elements(device, dtype)
    tall = matrices if matrices.shape[1] >= matrices.shape[2] else matrices.mT  # (k, M, r), M ≥ r
    k, rows, r = tall.shape
    step = max(1, chunk_elements // max(1, k * r))
    out = torch.zeros((k, r, r), device=device, dtype=dtype)
    for start in range(0, rows, step):
        block = tall[:, start:start + step].to(device).to(dtype)  # (k, b, r); upcast where it is computed
        for i0, i1 in panels(r):  # lower triangle, panel by panel: G[i0:, i0:i1] += block[:, i0:]ᵀ block[:, i0:i1]
            out[:, i0:, i0:i1].baddbmm_(block[:, :, i0:].mT, block[:, :, i0:i1])  # (k, r - i0, i1 - i0)
    if full:
        out = out.tril() + out.tril(-1).mT  # (k, r, r)
    return out


def panels(r: int) -> list[tuple[int, int]]:
    """Column panels ``(start, stop)`` in which `gram` multiplies out the lower triangle of an r×r result."""
    width = max(256, r // 8)
    return [(i, min(i + width, r)) for i in range(0, r, width)]


def gram_macs(m: int, n: int) -> int:
    """Multiply-adds `gram` spends on one m×n matrix (≈ 9/16 of max(m, n)·min(m, n)² for large ones)."""
    r = min(m, n)
    return max(m, n) * sum((r - i0) * (i1 - i0) for i0, i1 in panels(r))


def eigenvalues(matrices: torch.Tensor, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Pooled, ascending eigenvalues of WᵀW over a stack of matrices, in batches of `batch_matrices`.

    Args:
        matrices: ``(k, m, n)`` stack of matrices (any float dtype; upcast block by block).
        device: where to compute.
        dtype: compute precision of the Gram matrix and the eigensolver.

    Returns:
        ``(k·min(m, n),)`` eigenvalues in ascending order, on ``device``, clamped at zero; all ``nan`` when
        the matrices hold a non-finite value (the eigensolver cannot run on them).
    """
    device = torch.device(device)
    k, m, n = matrices.shape
    step = batch_matrices(min(m, n), device, dtype)
    parts = []
    for start in range(0, k, step):
        g = gram(matrices[start:start + step], device, dtype, full=False)  # (b, r, r)
        parts.append(gram_eigenvalues([g])[0])
        del g
    evals = parts[0] if len(parts) == 1 else torch.cat(parts).sort().values  # (k·r,); a nan sorts last
    return torch.full_like(evals, torch.nan) if bool(evals[-1].isnan()) else evals  # one bad batch: all nan


def batch_matrices(r: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many r×r Gram matrices one eigensolve batch holds: as many as fit, with the eigensolver's
    workspace (counted as two more copies), in `BATCH_BYTES` on CPU or half the free memory on CUDA."""
    budget = BATCH_BYTES
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    return max(1, budget // (3 * r * r * dtype.itemsize))


def gram_eigenvalues(grams: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pooled, ascending eigenvalues of each ``(k, r, r)`` stack of Gram matrices (all ``nan`` for a stack
    with a non-finite entry), their eigensolves shared out by `eigvalsh_shared`.

    Only the lower triangles are read (``gram(..., full=False)`` is enough). Finiteness is checked on the
    diagonal alone: a non-finite weight in column i makes G_ii = Σ_k W_ki² non-finite, and |G_ij| ≤
    √(G_ii G_jj) keeps every other entry finite when the diagonal is.
    """
    finite = [bool(torch.isfinite(g.diagonal(dim1=-2, dim2=-1)).all()) for g in grams]
    solved = iter(eigvalsh_shared([g for g, ok in zip(grams, finite) if ok]))
    return [next(solved).flatten().clamp_min(0).sort().values if ok  # (k·r,)
            else torch.full((g.shape[0] * g.shape[1],), torch.nan, device=g.device, dtype=g.dtype)
            for g, ok in zip(grams, finite)]


def eigvalsh_shared(grams: list[torch.Tensor]) -> list[torch.Tensor]:
    """``eigvalsh`` of each ``(k, r, r)`` stack (lower triangles): ``(k, r)`` ascending per matrix.

    On CPU, when there is enough work, the matrices of all stacks are shared out over torch's threads
    (largest first, each to the least loaded thread) and solved with one BLAS thread each: LAPACK's own
    threading of a single eigensolve scales poorly (measured in ``benchmarks/bench_spectrum.py``).
    """
    threads = torch.get_num_threads()
    items = [(i, j) for i, g in enumerate(grams) for j in range(g.shape[0])]  # one per matrix
    costs = [float(grams[i].shape[-1]) ** 3 for i, _ in items]
    if (threads < 2 or len(items) < 2 or grams[0].device.type != "cpu" or sum(costs) < PARALLEL_MIN_WORK
            or not torch.backends.openmp.is_available()):  # per-thread settings need OpenMP's thread-local ones
        return [torch.linalg.eigvalsh(g) for g in grams]
    workers = min(threads, len(items))
    owners = assign_by_cost(costs, workers)
    out = [torch.empty(g.shape[:2], dtype=g.dtype) for g in grams]

    def solve(thread: int) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP team and MKL: one thread (else they oversubscribe)
        for (i, j), owner in zip(items, owners):
            if owner == thread:
                out[i][j] = torch.linalg.eigvalsh(grams[i][j])  # (r,)

    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(solve, range(workers)))
    finally:
        torch.set_num_threads(threads)
    return out


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and peak RSS creeps up layer by layer)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():  # noqa: ANN202
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def farms_windows(matrices: torch.Tensor, window: int = 0, per_dim: int = 4, ratio: float = 1.0) -> torch.Tensor:
    """FARMS submatrices: ``per_dim`` × ``per_dim`` evenly spread windows of one fixed aspect ratio.

    Fixed-aspect-ratio matrix subsampling (Hu et al., ICML 2025) measures the pooled ESD of same-shaped
    submatrices instead of the whole matrix, removing the bias aspect ratio puts on alpha.

    Args:
        matrices: ``(k, m, n)`` stack.
        window: rows of a window (0: half the smaller side, at least 2).
        per_dim: windows along each side (fewer where the side is too short to hold them apart).
        ratio: columns per row of a window (1: square).

    Returns:
        ``(k·w, rows, cols)`` stack of windows.
    """
    k, m, n = matrices.shape
    rows = window or max(2, min(m, n) // 2)
    cols = max(1, round(rows * ratio))
    rows, cols = min(rows, m), min(cols, n)
    starts_r = torch.linspace(0, m - rows, min(per_dim, m - rows + 1)).round().long().unique()
    starts_c = torch.linspace(0, n - cols, min(per_dim, n - cols + 1)).round().long().unique()
    windows = [matrices[:, i:i + rows, j:j + cols] for i in starts_r.tolist() for j in starts_c.tolist()]
    return torch.cat(windows)  # (k·w, rows, cols)


def eigenvalues_svd(matrices: torch.Tensor, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same eigenvalues from ``svdvals`` (slower; the reference for accuracy checks)."""
    s = torch.linalg.svdvals(matrices.to(device=device, dtype=dtype))  # (k, r)
    return s.square().flatten().sort().values
