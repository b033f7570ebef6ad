"""Measuring planned layers: eigenvalues (shared eigensolves, one weight tensor held at a time), fit and
metrics per layer, the randomised ESD on request, and the work shared out over torch.distributed ranks."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator

import torch

from tbdiag.analysis.distributed import assign_by_cost, gather_items, world
from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import CONV_KINDS, LayerSpec, as_matrices
from tbdiag.esd.metrics import LayerResult, layer_result
from tbdiag.analysis.options import PRECISIONS, AnalyzeOptions
from tbdiag.esd.spectrum import (batch_matrices, eigenvalues, farms_windows, gram, gram_eigenvalues, release_memory,
                             resolve_device)

# (layer just done, its index, number of layers, cost done so far, total cost): bars advance by cost
Progress = Callable[[LayerSpec, int, int, float, float], None]


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
        spectra = [group[0].layer.eigenvalues().to(device, dtype)]  # (r·positions,), from the factors
    elif len(group) == 1:
        spectra = [eigenvalues(load(group[0]), device, dtype)]  # (n_evals,), in batches
    else:
        grams = [gram(load(spec), device, dtype, full=False) for spec in group]  # [(k, r, r)]
        spectra = gram_eigenvalues(grams)
        del grams
    release_memory()
    return spectra


def _low_rank(spec: LayerSpec) -> bool:
    """A LoRA update (`tbdiag.finetune.lora.LowRankSpec`): eigenvalues from its factors, no Gram matrix."""
    return getattr(spec, "layer", None) is not None


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _randomized(spec: LayerSpec, row: LayerResult, evals: torch.Tensor, options: AnalyzeOptions, device: torch.device,
                dtype: torch.dtype, rand_spectra: dict | None) -> LayerResult:
    """The row with its randomised-ESD fields (`tbdiag.esd.randomize`), reading the layer a second time."""
    from tbdiag.esd.randomize import randomized_fields

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
