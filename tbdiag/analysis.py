"""``analyze(source) -> Analysis``: every layer's ESD, power-law fit and metrics, one tensor at a time."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tbdiag import __version__
from tbdiag.checkpoint import open_checkpoint
from tbdiag.delta import pair_specs
from tbdiag.errors import TbdiagError
from tbdiag.layers import CONV_KINDS, LayerSpec, as_matrices, plan_layers
from tbdiag.metrics import LayerResult, layer_result, summarize
from tbdiag.powerlaw import FITS
from tbdiag.distributed import assign_by_cost, gather_items, world
from tbdiag.spectrum import (batch_matrices, eigenvalues, farms_windows, gram, gram_eigenvalues, release_memory,
                             resolve_device)

log = logging.getLogger(__name__)

SCHEMA = "tbdiag.analysis/v1"
# What the rows describe: the checkpoint's weights W; ΔW = W − W_base (a fine-tune against its base, or an
# adapter's s·B·A); or W_base + ΔW (an adapter merged into its base).
VIEWS = ("weights", "delta", "merged")
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
# (layer just done, its index, number of layers, cost done so far, total cost): bars advance by cost
Progress = Callable[[LayerSpec, int, int, float, float], None]


@dataclass(frozen=True)
class AnalyzeOptions:
    """Everything that decides an analysis' numbers. Written into the JSON as ``options``.

    Attributes:
        fit: power-law estimator: ``median`` (reference default), ``ks`` or ``peak``.
        xmin_pos: for ``median``, xmin is the eigenvalue at index ⌊N / xmin_pos⌋.
        conv_norm: convolution slices are scaled by √conv_norm (eigenvalues by conv_norm).
        min_evals: layers with fewer eigenvalues are measured but not fitted (status ``too_few_evals``).
        include: glob patterns of layer names to keep (all when empty).
        exclude: glob patterns of layer names to drop.
        include_embeddings: analyse embedding matrices too.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: compute dtype of the Gram matrix and eigensolver, ``float64`` or ``float32``.
        peak_bins: histogram bins of the ``peak`` estimator.
        peak_lower_bound_quirk: reproduce the reference ``peak`` implementation's lower bound.
        key: dotted entry of a nested checkpoint that holds the weights (found automatically when None).
        trust_pickle: allow arbitrary unpickling / TorchScript (trusted files only).
        split_qkv: analyse fused query/key/value matrices as three parts.
        estimator: ``full`` (the whole matrix's ESD) or ``farms`` (pooled ESD of fixed-aspect-ratio windows).
        farms_window: FARMS window rows (0: half the smaller side).
        farms_per_dim: FARMS windows along each side.
        farms_ratio: FARMS window columns per row (1: square).
        randomize: also the ESD of each layer with its entries permuted, ``rand_distance`` and the
            correlation traps (`tbdiag.randomize`; the full estimator only).
        seed: seed of the permutations (with the layer name).
    """

    fit: str = "ks"
    xmin_pos: float = 2.0
    conv_norm: float = 0.5
    min_evals: int = 10
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_embeddings: bool = False
    device: str = "auto"
    precision: str = "float64"
    peak_bins: int = 100
    peak_lower_bound_quirk: bool = False
    key: str | None = None
    trust_pickle: bool = False
    split_qkv: bool = False
    estimator: str = "full"
    farms_window: int = 0
    farms_per_dim: int = 4
    farms_ratio: float = 1.0
    randomize: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("fit", self.fit in FITS, f"unknown estimator; use one of {', '.join(FITS)}"),
            ("xmin_pos", self.xmin_pos >= 1, "must be at least 1 (2 puts xmin at the median)"),
            ("conv_norm", self.conv_norm > 0, "must be positive (the reference uses 0.5)"),
            ("precision", self.precision in PRECISIONS, "use float64 or float32"),
            ("estimator", self.estimator in ("full", "farms"), "use full or farms"),
            ("farms_per_dim", self.farms_per_dim >= 1, "must be at least 1"),
            ("farms_ratio", self.farms_ratio > 0, "must be positive"),
            ("farms_window", self.farms_window >= 0, "must be 0 (half the smaller side) or more"),
            ("min_evals", self.min_evals >= 2, "a fit needs at least 2 eigenvalues"),
        ]
        for name, ok, why in checks:
            if not ok:
                flag = {"farms_per_dim": "--farms-windows"}.get(name, "--" + name.replace("_", "-"))
                raise TbdiagError(f"{name} {getattr(self, name)}: {why}", cli={f"{name} ": f"{flag} "})
        if self.randomize and self.estimator != "full":
            raise TbdiagError("randomize compares the full ESD with its shuffled twin; it does not apply to the "
                              f"{self.estimator} estimator: use the full estimator",
                              cli={"randomize": "--randomize", "the full estimator": "--estimator full"})
        if not 0 <= self.seed < 2 ** 63:
            raise TbdiagError(f"seed {self.seed}: must be a whole number from 0 to 2^63 − 1")

    def fit_kwargs(self) -> dict[str, Any]:
        """Arguments of the chosen estimator."""
        if self.fit == "median":
            return {"xmin_pos": self.xmin_pos}
        if self.fit == "peak":
            return {"bins": self.peak_bins, "lower_bound_quirk": self.peak_lower_bound_quirk}
        return {}


@dataclass(frozen=True)
class Analysis:
    """The result of `analyze`: one `LayerResult` per layer in checkpoint order, and a summary."""

    source: str
    format: str
    n_params: int
    options: AnalyzeOptions
    layers: tuple[LayerResult, ...]
    summary: dict
    timing: dict = field(default_factory=dict, compare=False)
    spectra: dict = field(default_factory=dict, compare=False, repr=False)  # name -> eigenvalues (keep_spectra)
    rand_spectra: dict = field(default_factory=dict, compare=False, repr=False)  # name -> randomised eigenvalues
    base: str | None = None  # the base checkpoint of a delta or merged view
    view: str = "weights"  # `VIEWS`: what matrices the rows describe

    def to_dict(self) -> dict:
        """The ``tbdiag.analysis/v1`` document (non-finite floats still as ``nan``; see `tbdiag.export`)."""
        options = dataclasses.asdict(self.options)
        options["include"], options["exclude"] = list(self.options.include), list(self.options.exclude)
        options.pop("trust_pickle")
        return {
            "schema": SCHEMA, "tbdiag_version": __version__, "source": self.source, "format": self.format,
            "n_params": self.n_params, "view": self.view, "base": self.base, "options": options,
            "layers": [dict(dataclasses.asdict(r), shape=list(r.shape)) for r in self.layers],
            "summary": self.summary, "timing": self.timing,
        }


def analyze(source: Any, options: AnalyzeOptions | None = None, *, base: Any = None, view: str | None = None,
            progress: Progress | None = None, keep_spectra: bool = False, **overrides: Any) -> Analysis:
    """Analyse every layer of a checkpoint, state dict, module or PEFT LoRA adapter folder.

    Args:
        source: a path (file or folder; an adapter folder holds ``adapter_config.json``), a state dict, or an
            ``nn.Module``.
        options: analysis options; keyword ``overrides`` replace single fields (``fit="ks"``).
        base: the checkpoint ``source`` was fine-tuned from (any form ``source`` takes but an adapter).
        view: one of `VIEWS`: ``delta`` (the default with a base or for an adapter) analyses ΔW per layer;
            ``merged`` W_base + ΔW of an adapter (needs ``base``); ``weights`` the checkpoint's own weights.
        progress: called after each layer.
        keep_spectra: keep every layer's eigenvalues (float64 numpy arrays) in ``Analysis.spectra`` (and the
            randomised ones in ``Analysis.rand_spectra``), for plotting; not part of the JSON.

    Returns:
        The `Analysis`.

    Raises:
        TbdiagError: bad options, an unreadable checkpoint, a checkpoint without layers, or a base that does not
            match (a layer missing or of another shape).
    """
    options = dataclasses.replace(options or AnalyzeOptions(), **overrides)
    device = resolve_device(options.device)
    t0 = time.perf_counter()
    planned = plan_source(source, options, base=base, view=view)
    log.info("%s: %s, %d layers", planned.source, planned.format, len(planned.specs))
    spectra: dict = {}
    rand_spectra: dict = {}
    rows = measure_shared(planned.specs, options, device=device, progress=progress,
                          spectra=spectra if keep_spectra else None, rand_spectra=rand_spectra if keep_spectra else None)
    summary = dict(summarize(rows, options.fit), skipped=planned.skipped)
    timing = {"total_s": time.perf_counter() - t0, "device": str(device)}
    return Analysis(planned.source, planned.format, planned.n_params, options, tuple(rows), summary, timing, spectra,
                    rand_spectra, planned.base, planned.view)


@dataclass(frozen=True)
class Planned:
    """What `plan_source` found: the layers to measure and where they come from."""

    source: str
    format: str
    n_params: int
    specs: list
    skipped: dict
    base: str | None
    view: str


def plan_source(source: Any, options: AnalyzeOptions, *, base: Any = None, view: str | None = None) -> Planned:
    """Open ``source`` (and ``base``) and plan the layers of the chosen view (see `analyze`), reading no weights."""
    from tbdiag.lora import adapter_folder

    folder = adapter_folder(source)
    view = view or ("delta" if folder is not None or base is not None else "weights")
    if view not in VIEWS:
        raise TbdiagError(f"view {view}: unknown; use one of {', '.join(VIEWS)}")
    if folder is not None:
        planned = _plan_adapter(folder, options, base, view)
    else:
        ckpt = open_checkpoint(source, key=options.key, trust_pickle=options.trust_pickle)
        specs, skipped = _plan(ckpt, options)
        if view == "merged":
            raise TbdiagError(f"{ckpt.source}: not an adapter folder (adapter_config.json), so there is no ΔW to merge; "
                              "analyse the fine-tuned checkpoint itself, or its delta against the base")
        base_source = None
        if view == "delta":
            if base is None:
                raise TbdiagError(f"{ckpt.source}: a delta needs the base checkpoint it was fine-tuned from; pass one")
            base_ckpt = open_checkpoint(base, trust_pickle=options.trust_pickle)
            base_specs, _ = _plan(base_ckpt, options)
            specs, skipped["base_only"] = pair_specs(specs, base_specs, ckpt.source, base_ckpt.source)
            base_source = base_ckpt.source
        planned = Planned(ckpt.source, ckpt.format, ckpt.n_params, specs, skipped, base_source, view)
    if not planned.specs:
        hint = "loosen the include/exclude patterns" if planned.skipped.get("excluded") else "pass a model checkpoint"
        raise TbdiagError(f"{planned.source}: no layers to analyse (no Linear/Conv weights found); {hint}")
    return planned


def _plan(ckpt: Any, options: AnalyzeOptions, include_embeddings: bool | None = None) -> tuple[list, dict]:
    embeddings = options.include_embeddings if include_embeddings is None else include_embeddings
    return plan_layers(ckpt, include=options.include, exclude=options.exclude, include_embeddings=embeddings,
                       split_qkv=options.split_qkv)


def _plan_adapter(folder: Any, options: AnalyzeOptions, base: Any, view: str) -> Planned:
    """Plan an adapter's layers: ΔW = s·B·A (``delta``) or W_base + ΔW (``merged``, needs ``base``)."""
    from tbdiag.lora import adapter_specs, open_adapter

    if view == "weights":
        raise TbdiagError(f"{folder}: a LoRA adapter holds no full weights; analyse its updates (delta) or, with the "
                          "base model, the merged weights")
    adapter = open_adapter(folder)
    base_refs = base_source = None
    if view == "merged":
        if base is None:
            raise TbdiagError(f"{folder}: merging the adapter needs the base model it was trained on; pass it as base")
        base_ckpt = open_checkpoint(base, trust_pickle=options.trust_pickle)
        # every matrix of the base, whatever the filters: they apply to the adapter's layers
        base_refs = {s.name: s.ref for s in plan_layers(base_ckpt, include_embeddings=True)[0]}
        base_source = base_ckpt.source
    specs, skipped = adapter_specs(adapter, base_refs, include=options.include, exclude=options.exclude)
    n_params = sum(t.shape[0] * t.shape[1] for layer in adapter.layers for t in (layer.a, layer.b))
    return Planned(adapter.source, "peft-lora", n_params, specs, skipped, base_source, view)


def measure_layers(specs: list[LayerSpec], options: AnalyzeOptions, *, device: torch.device | None = None,
                   progress: Progress | None = None, spectra: dict | None = None,
                   rand_spectra: dict | None = None) -> list[LayerResult]:
    """Eigenvalues, fit and metrics of each planned layer, reading one weight tensor at a time.

    When ``spectra`` is a dict, each layer's eigenvalues are stored there (numpy, by layer name); with
    ``options.randomize``, ``rand_spectra`` gets the randomised ones (the layer is read a second time).
    """
    device = device or resolve_device(options.device)
    dtype = PRECISIONS[options.precision]
    rows = []
    total_cost, done_cost = sum(s.cost for s in specs), 0.0
    # Layers are solved in small groups of one Gram size, whose eigensolves share the CPU threads.
    threads = torch.get_num_threads() if device.type == "cpu" and options.estimator != "farms" else 1
    groups = solve_groups(specs, threads, device, dtype)
    load = functools.partial(_matrices, options=options)
    solved = itertools.chain.from_iterable(zip(g, group_spectra(g, load, device, dtype)) for g in groups)
    for index, (spec, evals) in enumerate(solved):
        if spec.kind in CONV_KINDS.values():
            evals = evals * options.conv_norm
        if spectra is not None:
            spectra[spec.name] = evals.double().cpu().numpy()
        zero_rtol = max(spec.shape[0], spec.shape[1]) * torch.finfo(dtype).eps
        row = layer_result(spec.name, spec.kind, spec.shape, evals, fit=options.fit,
                           fit_kwargs=options.fit_kwargs(), min_evals=options.min_evals, zero_rtol=zero_rtol)
        if _low_rank(spec):
            row = dataclasses.replace(row, warning=_join(row.warning, f"rank-{spec.layer.rank} update: its "
                                                                      f"{len(evals)} non-zero eigenvalues"))
        elif options.randomize and row.lambda_max > 0:  # finite and not all zero
            row = _randomized(spec, row, evals, options, device, dtype, rand_spectra)
        rows.append(row)
        done_cost += spec.cost
        if progress is not None:
            progress(spec, index, len(specs), done_cost, total_cost)
    return rows


def solve_groups(specs: list[LayerSpec], threads: int, device: torch.device,
                 dtype: torch.dtype) -> Iterator[list[LayerSpec]]:
    """Runs of consecutive layers whose eigensolves are shared out together (`eigvalsh_shared`): up to
    ``threads`` layers with Gram matrices of one size that fit in one eigensolve batch."""
    group: list[LayerSpec] = []
    group_r = matrices = 0
    for spec in specs:
        r = -1 if _low_rank(spec) else min(spec.shape[0], spec.shape[1])  # a low-rank update is solved alone
        if group and (len(group) == threads or r != group_r or r == -1
                      or matrices + spec.n_matrices > batch_matrices(r, device, dtype)):
            yield group
            group, matrices = [], 0
        group.append(spec)
        group_r, matrices = r, matrices + spec.n_matrices
    if group:
        yield group


def group_spectra(group: list[LayerSpec], load: Callable[[LayerSpec], torch.Tensor], device: torch.device,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """Pooled eigenvalues of each layer of a group (`solve_groups`), with ``load`` giving a layer's
    ``(k, m, n)`` matrices; one layer's weight is held at a time."""
    if len(group) == 1 and _low_rank(group[0]):
        from tbdiag.lora import lowrank_eigenvalues

        spectra = [lowrank_eigenvalues(*group[0].layer.factors(), group[0].layer.scale).to(device, dtype)]  # (r,)
    elif len(group) == 1:
        spectra = [eigenvalues(load(group[0]), device, dtype)]  # (n_evals,), in batches
    else:
        grams = [gram(load(spec), device, dtype, full=False) for spec in group]  # [(k, r, r)]
        spectra = gram_eigenvalues(grams)
        del grams
    release_memory()
    return spectra


def _low_rank(spec: LayerSpec) -> bool:
    """A LoRA update (`tbdiag.lora.LowRankSpec`): eigenvalues from its factors, no Gram matrix."""
    return getattr(spec, "layer", None) is not None


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _randomized(spec: LayerSpec, row: LayerResult, evals: torch.Tensor, options: AnalyzeOptions, device: torch.device,
                dtype: torch.dtype, rand_spectra: dict | None) -> LayerResult:
    """The row with its randomised-ESD fields (`tbdiag.randomize`), reading the layer a second time."""
    from tbdiag.randomize import randomized_fields

    scale = options.conv_norm if spec.kind in CONV_KINDS.values() else 1.0
    fields, rand = randomized_fields(spec.name, as_matrices(spec.ref.load(), spec.kind),
                                     evals.double().cpu().numpy(), seed=options.seed, scale=scale, device=device,
                                     dtype=dtype)
    if rand_spectra is not None:
        rand_spectra[spec.name] = rand
    release_memory()
    return dataclasses.replace(row, **fields)


def _matrices(spec: LayerSpec, options: AnalyzeOptions) -> torch.Tensor:
    mats = as_matrices(spec.ref.load(), spec.kind)  # (k, out, in)
    if options.estimator == "farms":
        mats = farms_windows(mats, options.farms_window, options.farms_per_dim, options.farms_ratio)
    return mats


def measure_shared(specs: list[LayerSpec], options: AnalyzeOptions, *, device: torch.device | None = None,
                   progress: Progress | None = None, spectra: dict | None = None,
                   rand_spectra: dict | None = None) -> list[LayerResult]:
    """`measure_layers` over the ranks of a torch.distributed group: each rank reads and measures its share
    (largest cost first), every rank gets all rows, in plan order. One process: plain `measure_layers`.

    Raises:
        TbdiagError: on every rank, when any rank failed (naming it), instead of leaving the others waiting.
    """
    rank, size = world()
    if size == 1:
        return measure_layers(specs, options, device=device, progress=progress, spectra=spectra,
                              rand_spectra=rand_spectra)
    owners = assign_by_cost([s.cost for s in specs], size)
    mine = [i for i, o in enumerate(owners) if o == rank]
    local_spectra: dict | None = {} if spectra is not None else None
    local_rand: dict | None = {} if rand_spectra is not None else None
    try:
        rows = measure_layers([specs[i] for i in mine], options, device=device, progress=progress, spectra=local_spectra,
                              rand_spectra=local_rand)
        local: dict = {i: (row, (local_spectra or {}).get(row.name), (local_rand or {}).get(row.name))
                       for i, row in zip(mine, rows)}
    except Exception as exc:  # noqa: BLE001 - gathered below and raised on every rank
        local = {-1 - rank: f"rank {rank}: {exc}"}  # negative keys carry errors through the same gather
    merged = gather_items(local)
    errors = [message for key, message in sorted(merged.items()) if key < 0]
    if errors:
        raise TbdiagError(f"distributed analysis failed ({'; '.join(errors)})")
    if spectra is not None:
        spectra.update({merged[i][0].name: merged[i][1] for i in range(len(specs))})
    if rand_spectra is not None:
        rand_spectra.update({merged[i][0].name: merged[i][2] for i in range(len(specs)) if merged[i][2] is not None})
    return [merged[i][0] for i in range(len(specs))]
