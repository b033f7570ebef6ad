"""Randomised ESD and correlation traps (``randomize``): what a layer's spectrum looks like with its
entries shuffled, and which entries still stand out.

Each kernel slice of a layer (the whole matrix of a Linear) has its entries permuted at random — the same
values, no correlations left — and its ESD is computed as the real one is (``conv_norm`` included). A
permutation is seeded by the analysis' ``seed`` and the layer's name, so a layer gets the same one in any
order, on any rank. Then, with WeightWatcher's definitions:

- ``rand_distance``: the Jensen–Shannon distance between the sorted real and randomised eigenvalues
  (`tbdiag.esd.mp.js_distance`): near 0 when the layer is random-like, larger when training left structure.
- ``rand_bulk_max``: the MP bulk edge λ₊ fitted to the randomised ESD (`tbdiag.esd.mp.mp_fit`).
- ``num_traps``: randomised eigenvalues above λ₊ plus its Tracy–Widom margin. A shuffled matrix has no
  correlations, so an eigenvalue outside its bulk comes from a few unusually large entries: a
  *correlation trap*.
- ``traps``: for each trap, its eigenvalue and the entries responsible. With σ, u, v the trap's singular
  triplet of the shuffled slice W′, σ = Σ_ab u_a·W′_ab·v_b; the entries with the largest |u_a·W′_ab·v_b|
  (up to `ENTRIES_PER_TRAP`, each at least `ENTRY_SHARE` of the largest) are reported at their place in the real weight (``slice``: kernel position,
  ``row``, ``col`` of the stored tensor) with their value.

WeightWatcher draws five permutations for layers of fewer than 100 eigenvalues per slice and a separate
one for ``rand_distance``; tbdiag draws one, used for all three.
"""

from __future__ import annotations

import zlib
import numpy as np
import torch

from tbdiag.esd.mp import js_distance, mp_fit, spike_threshold
from tbdiag.esd.spectrum import eigenvalues

ENTRIES_PER_TRAP = 3
ENTRY_SHARE = 0.1  # an entry is listed when its part of σ is at least this share of the largest part
MAX_TRAPS = 10  # traps listed with their entries per layer (num_traps counts them all)


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    """The generator of one slice's permutation: from the seed, the layer name and the slice index, folded to the
    32 bits torch's CPU generator reads (each seed below 2^32 gives a layer its own permutations: 1_000_003 is odd)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}\0{index}".encode())) % (2 ** 32))


def permutation(seed: int, name: str, index: int, numel: int) -> torch.Tensor:
    """The permutation of slice ``index`` of layer ``name``: shuffled.flat[i] = original.flat[perm[i]]."""
    return torch.randperm(numel, generator=_generator(seed, name, index))


def shuffled(mats: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Each ``(m, n)`` slice of a ``(k, m, n)`` stack with its entries permuted (`permutation`)."""
    k, m, n = mats.shape
    flat = mats.reshape(k, m * n)
    return torch.stack([flat[i][permutation(seed, name, i, m * n)] for i in range(k)]).reshape(k, m, n)


def randomized_fields(name: str, mats: torch.Tensor, evals: np.ndarray, *, seed: int, scale: float,
                      device: torch.device, dtype: torch.dtype) -> tuple[dict, np.ndarray]:
    """The randomised-ESD fields of a row (module docstring) and the randomised eigenvalues.

    Args:
        name: layer name (seeds the permutation).
        mats: ``(k, m, n)`` matrices of the layer.
        evals: the real eigenvalues (ascending, finite, scaled by ``scale``).
        seed: the analysis' seed.
        scale: the eigenvalue scale of the layer (``conv_norm`` for convolutions, else 1).
    """
    k, m, n = mats.shape
    rand = shuffled(mats, seed, name)
    rand_evals = (eigenvalues(rand, device, dtype) * scale).double().cpu().numpy()
    fields = {"rand_lambda_max": float(rand_evals[-1]), "rand_distance": js_distance(evals, rand_evals)}
    if len(rand_evals) < 2 or rand_evals[-1] <= 0:
        return fields, rand_evals
    fit = mp_fit(rand_evals, max(m, n), min(m, n))
    fields.update(rand_bulk_max=fit.bulk_max, num_traps=fit.num_spikes)
    if fit.num_spikes:
        mean = float(np.mean(rand_evals))  # mp_fit's unit: eigenvalues of mean 1
        above = spike_threshold(fit.bulk_max / mean, max(m, n) / min(m, n), min(m, n)) * mean
        fields["traps"] = trap_entries(rand, seed, name, scale, above, min(fit.num_spikes, MAX_TRAPS))
    return fields, rand_evals


def trap_entries(rand: torch.Tensor, seed: int, name: str, scale: float, above: float, count: int) -> tuple:
    """The ``count`` largest eigenvalues above ``above`` of the shuffled stack, each with the entries that
    make it (largest |u_a·W′_ab·v_b|), at their place in the real weight."""
    k, m, n = rand.shape
    found: list[tuple[float, int, int]] = []  # (eigenvalue, slice, singular index)
    svds: dict[int, tuple] = {}
    for i in range(k):
        u, s, vh = torch.linalg.svd(rand[i].double(), full_matrices=False)
        top = [(float(v) ** 2 * scale, i, j) for j, v in enumerate(s[:count]) if float(v) ** 2 * scale > above]
        if top:
            svds[i] = (u, vh, rand[i].double())
            found.extend(top)
    traps = []
    for ev, i, j in sorted(found, reverse=True)[:count]:
        u, vh, w = svds[i]
        contrib = (u[:, j, None] * w * vh[j, None, :]).abs().flatten()  # (m·n,) |u_a W′_ab v_b|
        values, picks = contrib.topk(min(ENTRIES_PER_TRAP, m * n))
        picks = picks[values >= ENTRY_SHARE * values[0]]
        perm = permutation(seed, name, i, m * n)
        entries = []
        for pos in picks.tolist():
            row, col = divmod(int(perm[pos]), n)
            entries.append({"slice": i, "row": row, "col": col, "value": float(w.flatten()[pos])})
        traps.append({"eigenvalue": ev, "entries": entries})
    return tuple(traps)

