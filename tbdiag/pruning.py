"""``prune(source, out, sparsity=S)``: unstructured magnitude pruning with per-layer sparsities from alpha
(AlphaPruning, Lu et al., NeurIPS 2024), written as a new safetensors checkpoint one tensor at a time.

**Which layers** (`tbdiag.tempbalance.tuned`, the one rule of `recommend` and `TempBalance`): Linear and Conv
weights, embeddings never; the input and output layers are left dense unless ``prune_first_last`` — in a model
of numbered blocks every layer outside the blocks, as AlphaPruning prunes the linear layers of the transformer
blocks and neither the embeddings nor the LM head; otherwise the first and the last layer — and so are layers
with fewer than ``min_evals`` eigenvalues. **Unit** ``layer`` (a sparsity per weight tensor) or ``block`` (the
block's mean alpha, one sparsity per block, its layers' sizes summed; AlphaPruning's ``block_wise``).

**Alphas**: the ``peak`` fit by default, AlphaPruning's ``alpha_peak`` (its ``xmin_peak`` "fix fingers": the
KS search restricted to xmin within 0.95–1.5× the mode of the log-spectrum); ``peak_lower_bound_quirk``
reproduces the reference code's lower bound (log10 of the bound compared with linear eigenvalues).

**Allocation**: ``alpha`` — `tbdiag.tempbalance.allocate.sparsity`, ratios linear in alpha over [1 − ε, 1 + ε]
rescaled so that the parameter-weighted mean sparsity is exactly S (higher alpha, i.e. less heavy-tailed,
more pruned, as in the paper's code); ``uniform`` — S for every layer.

**Pruning**: each tensor loses exactly round(s·n) entries, those of smallest |w| (ties broken by lowest flat
index; NaN counts as the largest magnitude), so the realised mean is within half an entry per layer of S.

**Output** (`tbdiag.pruned_files`): safetensors, never over the input, written to temporaries and renamed all
at once (the weights and the ``tbdiag.allocation/v1`` JSON). A safetensors input keeps its layout byte for
byte (same header entries and data offsets, every other tensor copied in chunks); a folder input gives a new
folder mirroring it (shards, index, config, tokenizer …). PyTorch inputs (read with ``weights_only=True``)
become safetensors with the state-dict names, ordered by dtype size in the file and by model order in
``tbdiag_order``. At most one input tensor is held at a time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tbdiag import __version__
from tbdiag.measure import measure_layers
from tbdiag.options import AnalyzeOptions
from tbdiag.checkpoint import open_checkpoint
from tbdiag.errors import TbdiagError
from tbdiag.export import jsonable
from tbdiag.layers import FP8, layer_name, plan_layers
from tbdiag.powerlaw import FITS
from tbdiag.pruned_files import check_dtypes, check_targets, commit, input_layout
from tbdiag.tempbalance.allocate import SCHEMA
from tbdiag.tempbalance.allocate import sparsity as alpha_sparsities
from tbdiag.tempbalance.maps import unit_means
from tbdiag.tempbalance.tuned import UNITS, TuneOptions, tuned_layers
from tbdiag.tensors import Checkpoint, numel

log = logging.getLogger(__name__)

ALLOCATIONS = ("alpha", "uniform")


@dataclass(frozen=True)
class PruneOptions:
    """What decides the allocation (written into the allocation JSON as ``parameters``)."""

    sparsity: float
    allocation: str = "alpha"
    epsilon: float = 0.3
    max_sparsity: float = 0.99
    unit: str = "layer"
    prune_first_last: bool = False
    min_evals: int = 50
    fit: str = "peak"
    peak_lower_bound_quirk: bool = False

    def __post_init__(self) -> None:
        alpha_sparsities([], [], self.sparsity, self.epsilon, self.max_sparsity)  # the allocator's checks, early
        for what, value, known in (("allocation", self.allocation, ALLOCATIONS), ("unit", self.unit, UNITS),
                                   ("fit", self.fit, tuple(FITS))):
            if value not in known:
                raise TbdiagError(f"{what} {value!r}: unknown; use one of {', '.join(known)}")
        if self.min_evals < 2:
            raise TbdiagError(f"min_evals {self.min_evals}: must be at least 2")


@dataclass(frozen=True)
class PrunedLayer:
    """One pruned weight tensor: its allocated sparsity and the entries set to zero."""

    name: str  # layer name: the tensor name without ``.weight``
    tensor: str
    unit: str  # the layer itself, or its block with unit ``block``
    alpha: float  # the layer's own alpha (mean over the experts of a stacked tensor); nan for ``uniform``
    unit_alpha: float  # the alpha the allocation read: the unit's mean
    sparsity: float  # allocated
    n_params: int
    n_pruned: int  # round(sparsity · n_params)

    @property
    def realised(self) -> float:
        """The fraction of entries set to zero."""
        return self.n_pruned / self.n_params


@dataclass(frozen=True)
class PruneResult:
    """What `prune` allocated and wrote; ``realised_mean`` is the parameter-weighted mean of the layers."""

    source: str
    out: str | None
    options: PruneOptions
    layers: tuple[PrunedLayer, ...]
    n_params: int
    n_pruned: int
    realised_mean: float
    copied: tuple[str, ...] = ()  # a folder input's other files copied into the output folder (config, tokenizer …)
    left_out: tuple[tuple[str, str], ...] = ()  # and those not copied, (path, why): weights in other formats …

    def to_dict(self) -> dict:
        """The ``tbdiag.allocation/v1`` document of `recommend --target sparsity` (per unit its alpha, layers,
        ``n_params`` and ``sparsity``), plus what was pruned: ``n_pruned`` per unit and in all, and the realised
        mean. Non-finite alphas stay ``nan`` (`tbdiag.export.jsonable` makes them ``null``)."""
        o = self.options
        alpha = o.allocation == "alpha"
        units: dict[str, dict] = {}
        for x in self.layers:
            unit = units.setdefault(x.unit, {"alpha": x.unit_alpha, "layers": [], "n_params": 0, "sparsity": x.sparsity,
                                             "n_pruned": 0})
            unit["layers"].append(x.name)
            unit["n_params"] += x.n_params
            unit["n_pruned"] += x.n_pruned
        parameters = {"sparsity": o.sparsity, "epsilon": o.epsilon if alpha else 0.0, "max_sparsity": o.max_sparsity,
                      "allocation": o.allocation, "prune_first_last": o.prune_first_last, "min_evals": o.min_evals,
                      "peak_lower_bound_quirk": o.peak_lower_bound_quirk}
        return {"schema": SCHEMA, "tbdiag_version": __version__, "source": self.source, "target": "sparsity",
                "unit": o.unit, "fit": o.fit if alpha else None, "parameters": parameters, "layers": units,
                "n_params": self.n_params, "n_pruned": self.n_pruned, "realised_mean": self.realised_mean}

    def to_json(self) -> str:
        """The allocation document as JSON text (``null`` for what could not be computed)."""
        return json.dumps(jsonable(self.to_dict()), indent=1) + "\n"


def prune(source: str | Path, out: str | Path | None = None, *, sparsity: float, allocation: str = "alpha",
          epsilon: float = 0.3, max_sparsity: float = 0.99, unit: str = "layer", prune_first_last: bool = False,
          min_evals: int = 50, fit: str = "peak", peak_lower_bound_quirk: bool = False,
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
        unit, prune_first_last, min_evals: which layers and units (see the module's description).
        fit, peak_lower_bound_quirk: the power-law fit of the alphas.
        allocation_json: also write the ``tbdiag.allocation/v1`` JSON here.
        key, trust_pickle, device: as for `tbdiag.analyze`.
        overwrite: replace an existing checkpoint file named by ``out`` (refused otherwise).

    Raises:
        TbdiagError: bad numbers or choices, an output that is an input (or inside an input folder), an
            unreadable checkpoint, one without prunable layers; all before anything is written.
    """
    options = PruneOptions(sparsity, allocation, epsilon, max_sparsity, unit, prune_first_last, min_evals, fit,
                           peak_lower_bound_quirk)
    layout = input_layout(source)
    target = check_targets(source, layout, out, allocation_json, overwrite=overwrite)
    ckpt = open_checkpoint(source, key=key, trust_pickle=trust_pickle)
    if target.out is not None and not ckpt.format.startswith("safetensors"):
        check_dtypes(ckpt)
    layers = allocate(ckpt, options, device=device)
    n_params, n_pruned = sum(x.n_params for x in layers), sum(x.n_pruned for x in layers)
    result = PruneResult(ckpt.source, None if out is None else str(out), options, layers, n_params, n_pruned,
                         n_pruned / n_params, target.companions, target.left_out)
    log.info("%s: %d layers, realised mean sparsity %.6f (target %g)", ckpt.source, len(layers),
             result.realised_mean, sparsity)
    commit(target, ckpt, layout, {x.tensor: x.n_pruned for x in layers},
           result.to_json() if target.allocation_json is not None else None, key=key, trust_pickle=trust_pickle)
    return result


def allocate(ckpt: Checkpoint, options: PruneOptions, *, device: str = "auto") -> tuple[PrunedLayer, ...]:
    """The pruned layers of an opened checkpoint with their sparsities (reads weights only to fit alphas).

    Raises:
        TbdiagError: no prunable layer, or an FP8 one (its magnitudes need its scales).
    """
    specs, _ = plan_layers(ckpt)
    tune = TuneOptions(unit=options.unit, exclude_first_last=not options.prune_first_last,
                       min_evals=options.min_evals)
    tuned = tuned_layers(specs, tune)
    if not tuned:
        raise TbdiagError(f"{ckpt.source}: no layer to prune (Linear/Conv weights with ≥ {options.min_evals} "
                          "eigenvalues, input and output layers left dense); prune the first and last layers "
                          "too, lower the eigenvalue minimum, or pass a model checkpoint")
    refs = {r.name: r for r in ckpt.tensors}
    for t in tuned:
        if refs[t.tensor].dtype in FP8:
            raise TbdiagError(f"{ckpt.source}: {t.tensor} is {refs[t.tensor].dtype}; pruning FP8 weights is not "
                              "supported: dequantise the checkpoint first")
    chosen = {t.name for t in tuned}
    alphas = _alphas([s for s in specs if s.name in chosen], options, device)
    values = [alphas.get(t.name, math.nan) for t in tuned]
    unit_alpha = unit_means([t.unit for t in tuned], values)
    tensor_alpha = unit_means([t.tensor for t in tuned], values)
    tensor_unit = {t.tensor: t.unit for t in tuned}
    sizes = {u: 0 for u in unit_alpha}
    for tensor, u in tensor_unit.items():
        sizes[u] += numel(refs[tensor].shape)
    shares = _sparsities(list(unit_alpha.values()), list(sizes.values()), options)
    share = dict(zip(unit_alpha, shares))
    out = []
    for tensor, u in tensor_unit.items():
        n = numel(refs[tensor].shape)
        k = min(n, max(0, math.floor(share[u] * n + 0.5)))
        out.append(PrunedLayer(layer_name(tensor), tensor, u, tensor_alpha[tensor], unit_alpha[u], share[u], n, k))
    return tuple(out)


def _alphas(specs: list, options: PruneOptions, device: str) -> dict[str, float]:
    """Each layer's alpha, fitted as `tbdiag.analyze` fits it (``uniform``: none, nothing is read)."""
    if options.allocation != "alpha":
        return {}
    analysis = AnalyzeOptions(fit=options.fit, peak_lower_bound_quirk=options.peak_lower_bound_quirk, device=device)
    return {row.name: row.alpha for row in measure_layers(specs, analysis)}


def _sparsities(alphas: Sequence[float], sizes: Sequence[int], options: PruneOptions) -> list[float]:
    if options.allocation == "uniform":
        return [options.sparsity] * len(alphas)
    return alpha_sparsities(alphas, sizes, options.sparsity, options.epsilon, options.max_sparsity)


