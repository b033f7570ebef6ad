"""``analyze(source) -> Analysis``: every layer's ESD, power-law fit and metrics, one tensor at a time."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tbdiag import __version__
from tbdiag.checkpoint import open_checkpoint
from tbdiag.errors import TbdiagError
from tbdiag.layers import CONV_KINDS, LayerSpec, as_matrices, plan_layers
from tbdiag.metrics import LayerResult, layer_result, summarize
from tbdiag.powerlaw import FITS
from tbdiag.spectrum import eigenvalues, resolve_device

log = logging.getLogger(__name__)

SCHEMA = "tbdiag.analysis/v1"
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
Progress = Callable[[LayerSpec, int, int], None]  # (layer just done, its index, number of layers)


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
    """

    fit: str = "median"
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

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise TbdiagError(f"--fit {self.fit}: unknown estimator; use one of {', '.join(FITS)}")
        if not self.xmin_pos >= 1:
            raise TbdiagError(f"--xmin-pos {self.xmin_pos}: must be at least 1 (2 puts xmin at the median)")
        if not self.conv_norm > 0:
            raise TbdiagError(f"--conv-norm {self.conv_norm}: must be positive (the reference uses 0.5)")
        if self.precision not in PRECISIONS:
            raise TbdiagError(f"--precision {self.precision}: use float64 or float32")
        if self.min_evals < 2:
            raise TbdiagError(f"--min-evals {self.min_evals}: a fit needs at least 2 eigenvalues")

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

    def to_dict(self) -> dict:
        """The ``tbdiag.analysis/v1`` document (non-finite floats still as ``nan``; see `tbdiag.export`)."""
        options = dataclasses.asdict(self.options)
        options["include"], options["exclude"] = list(self.options.include), list(self.options.exclude)
        options.pop("trust_pickle")
        return {
            "schema": SCHEMA, "tbdiag_version": __version__, "source": self.source, "format": self.format,
            "n_params": self.n_params, "options": options,
            "layers": [dict(dataclasses.asdict(r), shape=list(r.shape)) for r in self.layers],
            "summary": self.summary, "timing": self.timing,
        }


def analyze(source: Any, options: AnalyzeOptions | None = None, *, progress: Progress | None = None,
            keep_spectra: bool = False, **overrides: Any) -> Analysis:
    """Analyse every layer of a checkpoint, state dict or module.

    Args:
        source: a path (file or folder), a state dict, or an ``nn.Module``.
        options: analysis options; keyword ``overrides`` replace single fields (``fit="ks"``).
        progress: called after each layer.
        keep_spectra: keep every layer's eigenvalues (float64 numpy arrays) in ``Analysis.spectra``,
            for plotting; not part of the JSON.

    Returns:
        The `Analysis`.

    Raises:
        TbdiagError: bad options, an unreadable checkpoint, or a checkpoint without layers.
    """
    options = dataclasses.replace(options or AnalyzeOptions(), **overrides)
    device = resolve_device(options.device)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(source, key=options.key, trust_pickle=options.trust_pickle)
    specs, skipped = plan_layers(ckpt, include=options.include, exclude=options.exclude,
                                 include_embeddings=options.include_embeddings)
    if not specs:
        hint = "loosen --include/--exclude" if skipped["excluded"] else "pass a model checkpoint"
        raise TbdiagError(f"{ckpt.source}: no layers to analyse (no Linear/Conv weights found); {hint}")
    log.info("%s: %s, %d layers", ckpt.source, ckpt.format, len(specs))
    spectra: dict = {}
    rows = measure_layers(specs, options, device=device, progress=progress, spectra=spectra if keep_spectra else None)
    total = time.perf_counter() - t0
    summary = dict(summarize(rows), skipped=skipped)
    timing = {"total_s": total, "device": str(device)}
    return Analysis(ckpt.source, ckpt.format, ckpt.n_params, options, tuple(rows), summary, timing, spectra)


def measure_layers(specs: list[LayerSpec], options: AnalyzeOptions, *, device: torch.device | None = None,
                   progress: Progress | None = None, spectra: dict | None = None) -> list[LayerResult]:
    """Eigenvalues, fit and metrics of each planned layer, reading one weight tensor at a time.

    When ``spectra`` is a dict, each layer's eigenvalues are stored there (numpy, by layer name).
    """
    device = device or resolve_device(options.device)
    dtype = PRECISIONS[options.precision]
    rows = []
    for index, spec in enumerate(specs):
        weight = spec.ref.load()
        evals = eigenvalues(as_matrices(weight, spec.kind), device, dtype)  # (n_evals,)
        del weight
        if spec.kind in CONV_KINDS.values():
            evals = evals * options.conv_norm
        if spectra is not None:
            spectra[spec.name] = evals.double().cpu().numpy()
        zero_rtol = min(spec.shape[0], spec.shape[1]) * torch.finfo(dtype).eps
        rows.append(layer_result(spec.name, spec.kind, spec.shape, evals, fit=options.fit,
                                 fit_kwargs=options.fit_kwargs(), min_evals=options.min_evals, zero_rtol=zero_rtol))
        if progress is not None:
            progress(spec, index, len(specs))
    return rows
