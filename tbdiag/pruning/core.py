"""``prune(source, out, sparsity=S)``: unstructured magnitude pruning with per-layer sparsities from alpha
(AlphaPruning, Lu et al., NeurIPS 2024), written as a new safetensors checkpoint one tensor at a time.

**Which layers** (`tbdiag.allocation.selection`, the one rule of `recommend` and `TempBalance`): Linear and Conv
weights, embeddings never; the input and output layers are left dense unless ``include_first_last`` — in a model
of numbered blocks every layer outside the blocks, as AlphaPruning prunes the linear layers of the transformer
blocks and neither the embeddings nor the LM head; otherwise the first and the last layer — and so are layers
with fewer than ``min_evals`` eigenvalues. The layers are those `tbdiag.analyze` sees: a stacked expert tensor
(E × out × in, ``mlp.experts.down_proj``) is E layers ``mlp.experts.down_proj.0`` …, each with its own alpha.
**Unit** ``layer`` (a sparsity per layer: per expert) or ``block`` (the block's mean alpha, one sparsity per
block, its layers' sizes summed; AlphaPruning's ``block_wise``).

**Alphas**: the ``peak`` fit by default, AlphaPruning's ``alpha_peak`` (its ``xmin_peak`` "fix fingers": the
KS search restricted to xmin within 0.95–1.5× the mode of the log-spectrum); ``peak_lower_bound_quirk``
reproduces the reference code's lower bound (log10 of the bound compared with linear eigenvalues).
`recommend --target sparsity` fits ``peak`` by default too, so it sells the sparsities ``prune`` applies.

**Allocation**: ``alpha`` — `tbdiag.allocation.allocators.sparsity`, ratios linear in alpha over [1 − ε, 1 + ε]
rescaled so that the parameter-weighted mean sparsity is exactly S (higher alpha, i.e. less heavy-tailed,
more pruned, as in the paper's code); ``uniform`` — S for every layer. A layer whose alpha is not finite (a
zero matrix, too few eigenvalues, a degenerate spectrum: its ``status``) has no say in the allocation: with
unit ``layer`` it takes ratio 1, the middle of the range; in a block, the block's mean alpha (ratio 1 when no
layer of the block has one). Such layers are logged as a warning and listed in ``fallbacks`` (the result, its
JSON, the CLI) with the sparsity they got and why.

**Pruning**: each layer (each expert on its own slice) is pruned to exactly round(s·n) zeros, its smallest |w|
(ties by lowest flat index; NaN counts as the largest). **Zeros already there count**: a layer holding z zeros
ends with max(z, round(s·n)), pruned only up to its target. ``n_pruned`` and the realised sparsities are the
zeros the output holds, counted as each tensor is written (without ``out``, in the input as it would be
pruned); a layer that had more zeros than its target reports more than it was allotted.

**Options and results**: `tbdiag.pruning.results`. **Output** (`tbdiag.pruning.files`, `tbdiag.pruning.tensors`):
safetensors, never over the input, written to temporaries and renamed all at once (the weights and the
``tbdiag.allocation/v1`` JSON). A safetensors input keeps its layout byte for byte (same header entries and
data offsets, every other tensor copied in chunks); a folder input gives a new folder mirroring it (shards,
index, config, tokenizer …). PyTorch inputs (read with ``weights_only=True``) become safetensors with every
state-dict name — a tied tensor (``lm_head.weight`` = ``transformer.wte.weight``) as a copy of its own —
ordered by dtype size in the file and by model order in ``tbdiag_order``. At most one input tensor is held
at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from tbdiag.io.checkpoint import open_checkpoint
from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import FP8, LayerSpec, plan_layers
from tbdiag.analysis.measure import measure_layers
from tbdiag.analysis.options import AnalyzeOptions
from tbdiag.pruning.results import ALLOCATIONS, Allotment, PrunedLayer, PruneOptions, PruneResult  # noqa: F401 - API
from tbdiag.pruning.files import Target, Written, check_dtypes, check_targets, commit, input_layout, refuse_empty
from tbdiag.allocation.allocators import DEFAULT_FITS
from tbdiag.allocation.allocators import sparsity as alpha_sparsities
from tbdiag.allocation.maps import unit_means
from tbdiag.allocation.selection import MIN_EVALS, TuneOptions, Tuned, sparsity_units, tuned_layers
from tbdiag.io.tensors import Checkpoint, TensorRef, numel

log = logging.getLogger(__name__)

def prune(source: str | Path, out: str | Path | None = None, *, sparsity: float, allocation: str = "alpha",
          epsilon: float = 0.3, max_sparsity: float = 0.99, unit: str = "layer", include_first_last: bool = False,
          min_evals: int = MIN_EVALS, fit: str = DEFAULT_FITS["sparsity"], peak_lower_bound_quirk: bool = False,
          allocation_json: str | Path | None = None, key: str | None = None, trust_pickle: bool = False,
          device: str = "auto", overwrite: bool = False) -> PruneResult:
    """Prune a checkpoint's layers by magnitude, each to its allocated sparsity, into a new checkpoint.

    Args:
        source: a checkpoint file or folder (safetensors, sharded, PyTorch).
        out: where the pruned checkpoint goes: a file, or for a folder input a new (or empty) folder that
            gets the folder's other files too (config, tokenizer; a single-file folder may also go to a
            ``.safetensors`` file); None writes no weights (the allocation alone).
        sparsity: the mean sparsity S over the pruned layers, weighted by their sizes (0 ≤ S < 1).
        allocation: ``alpha`` (AlphaPruning) or ``uniform``.
        epsilon, max_sparsity: the spread ε of the ratios (0 ≤ ε < 1) and the largest sparsity of a layer.
        unit, include_first_last, min_evals: which layers and units (see the module's description).
        fit, peak_lower_bound_quirk: the power-law fit of the alphas.
        allocation_json: also write the ``tbdiag.allocation/v1`` JSON here.
        key, trust_pickle, device: as for `tbdiag.analyze`.
        overwrite: replace an existing checkpoint file named by ``out`` (refused otherwise).

    Raises:
        TbdiagError: an empty path, bad numbers or choices, an output that is an input (or inside an input
            folder), an unreadable checkpoint, one without prunable layers; all before anything is written.
    """
    refuse_empty(source, out, allocation_json)
    options = PruneOptions(sparsity, allocation, epsilon, max_sparsity, unit, include_first_last, min_evals, fit,
                           peak_lower_bound_quirk)
    layout = input_layout(source)
    target = check_targets(source, layout, out, allocation_json, overwrite=overwrite)
    ckpt = open_checkpoint(source, key=key, trust_pickle=trust_pickle)
    if target.out is not None and not ckpt.format.startswith("safetensors"):
        check_dtypes(ckpt)
    allotted = allocate(ckpt, options, device=device)
    cuts: dict[str, dict[int | None, int]] = {}
    for a in allotted:
        cuts.setdefault(a.tensor, {})[a.expert] = a.n_target

    given = (ckpt.source, None if out is None else str(out), options, allotted, target)
    done = _result(*given, commit(target, ckpt, layout, cuts, lambda written: _result(*given, written).to_json(),
                                  key=key, trust_pickle=trust_pickle))
    if done.fallbacks:
        log.warning("%s: alpha not finite for %d of %d layers, allocated without it: %s", ckpt.source,
                    len(done.fallbacks), len(done.layers), "; ".join(done.fallback_notes()))
    log.info("%s: %d layers, realised mean sparsity %.6f (target %g)", ckpt.source, len(done.layers),
             done.realised_mean, sparsity)
    return done


def _result(source: str, out: str | None, options: PruneOptions, allotted: Sequence[Allotment], target: Target,
            written: Written) -> PruneResult:
    """The result of the allotments, with the zeros the written tensors hold (``written``: tensor → slice →
    (zeros before, zeros after))."""
    layers = tuple(PrunedLayer(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Allotment)},
                               n_pruned=written[a.tensor][a.expert][1], n_zero_input=written[a.tensor][a.expert][0])
                   for a in allotted)
    n_params, n_pruned = sum(x.n_params for x in layers), sum(x.n_pruned for x in layers)
    return PruneResult(source, out, options, layers, n_params, n_pruned, n_pruned / n_params, target.companions,
                       target.left_out)


def allocate(ckpt: Checkpoint, options: PruneOptions, *, device: str = "auto") -> tuple[Allotment, ...]:
    """The layers of an opened checkpoint to prune, with their sparsities (reads weights only to fit alphas).

    Raises:
        TbdiagError: no prunable layer, or an FP8 one (its magnitudes need its scales).
    """
    specs, _ = plan_layers(ckpt)
    tuned = tuned_layers(specs, TuneOptions(unit=options.unit, include_first_last=options.include_first_last,
                                            min_evals=options.min_evals))
    if not tuned:
        raise TbdiagError(f"{ckpt.source}: no layer to prune (Linear/Conv weights with ≥ {options.min_evals} "
                          "eigenvalues, input and output layers left dense); include the first and last layers, "
                          "lower the eigenvalue minimum, or pass a model checkpoint",
                          cli={"include the first and last layers": "--include-first-last",
                               "lower the eigenvalue minimum": "lower --min-evals"})
    refs = {r.name: r for r in ckpt.tensors}
    _refuse_fp8(ckpt.source, tuned, refs)
    by_name = {s.name: s for s in specs}
    chosen = [by_name[t.name] for t in tuned]
    fits = _alphas(chosen, options, device)
    units = sparsity_units(tuned, options.unit)
    alphas = [fits[t.name][0] if t.name in fits else math.nan for t in tuned]
    unit_alpha = unit_means(units, alphas)
    sizes = dict.fromkeys(unit_alpha, 0)
    for spec, u in zip(chosen, units):
        sizes[u] += numel(spec.shape)
    share = dict(zip(unit_alpha, _sparsities(list(unit_alpha.values()), list(sizes.values()), options)))
    out = []
    for t, spec, u, a in zip(tuned, chosen, units, alphas):
        n = numel(spec.shape)
        k = min(n, max(0, math.floor(share[u] * n + 0.5)))
        status = fits[t.name][1] if t.name in fits else "uniform"
        out.append(Allotment(t.name, t.tensor, _expert(spec, refs[t.tensor]), u, a, status, unit_alpha[u], share[u],
                             n, k))
    return tuple(out)


def _refuse_fp8(source: str, tuned: Sequence[Tuned], refs: dict[str, TensorRef]) -> None:
    for t in tuned:
        if refs[t.tensor].dtype in FP8:
            raise TbdiagError(f"{source}: {t.tensor} is {refs[t.tensor].dtype}; pruning FP8 weights is not "
                              "supported: dequantise the checkpoint first")


def _expert(spec: LayerSpec, ref: TensorRef) -> int | None:
    """The expert a layer is of a stacked (E, out, in) tensor (planned as ``name.e`` of shape (out, in))."""
    return int(spec.name.rsplit(".", 1)[1]) if len(ref.shape) == len(spec.shape) + 1 else None


def _alphas(specs: list[LayerSpec], options: PruneOptions, device: str) -> dict[str, tuple[float, str]]:
    """Each layer's alpha and the fit's status, fitted as `tbdiag.analyze` fits it (``uniform``: none, nothing
    is read). A nan alpha with status ``ok`` (a fit that gave no number) gets status ``not_finite``."""
    if options.allocation != "alpha":
        return {}
    analysis = AnalyzeOptions(fit=options.fit, peak_lower_bound_quirk=options.peak_lower_bound_quirk, device=device,
                              min_evals=options.min_evals)  # every selected layer is fitted, whatever the threshold
    return {row.name: (row.alpha, row.status if row.status != "ok" or math.isfinite(row.alpha) else "not_finite")
            for row in measure_layers(specs, analysis)}


def _sparsities(alphas: Sequence[float], sizes: Sequence[int], options: PruneOptions) -> list[float]:
    if options.allocation == "uniform":
        return [options.sparsity] * len(alphas)
    return alpha_sparsities(alphas, sizes, options.sparsity, options.epsilon, options.max_sparsity)
