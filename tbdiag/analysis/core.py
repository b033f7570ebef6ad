"""``analyze(source) -> Analysis``: every layer's ESD, power-law fit and metrics, one tensor at a time.

Planning (which layers of which source, and which view: weights, delta, merged) is here; the options are in
`tbdiag.analysis.options`, the measuring in `tbdiag.analysis.measure`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from tbdiag import __version__
from tbdiag.io.checkpoint import open_checkpoint
from tbdiag.finetune.delta import pair_specs
from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import plan_layers
from tbdiag.analysis.measure import Progress, measure_shared
from tbdiag.esd.metrics import LayerResult, summarize
from tbdiag.analysis.options import AnalyzeOptions
from tbdiag.esd.spectrum import resolve_device

log = logging.getLogger(__name__)

SCHEMA = "tbdiag.analysis/v1"
# What the rows describe: the checkpoint's weights W; ΔW = W − W_base (a fine-tune against its base, or an
# adapter's s·B·A); or W_base + ΔW (an adapter merged into its base).
VIEWS = ("weights", "delta", "merged")


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
        """The ``tbdiag.analysis/v1`` document (non-finite floats still as ``nan``; see `tbdiag.analysis.export`)."""
        options = dataclasses.asdict(self.options)
        options["include"], options["exclude"] = list(self.options.include), list(self.options.exclude)
        options.pop("trust_pickle")
        return {
            "schema": SCHEMA, "tbdiag_version": __version__, "source": self.source, "format": self.format,
            "n_params": self.n_params, "view": self.view, "base": self.base, "options": options,
            "layers": [dict(dataclasses.asdict(r), shape=list(r.shape)) for r in self.layers],
            "summary": self.summary, "timing": self.timing,
        }

    # In a notebook (`tbdiag.report.notebook`; pandas and matplotlib are imported only when called).
    def to_pandas(self) -> Any:
        """A pandas DataFrame: one row per layer in model order, every field of the row, ``nan`` for JSON nulls."""
        from tbdiag.report.notebook import analysis_frame
        return analysis_frame(self)

    def _repr_html_(self) -> str:
        """A notebook card: source, summary, alpha per layer (hover names each layer), the layer table."""
        from tbdiag.report.notebook import analysis_card
        return analysis_card(self)

    def plot(self) -> Any:
        """Alpha per layer in model order over the HT-SR bands (ks fit only): a matplotlib Figure."""
        from tbdiag.report.notebook import plot
        return plot(self)

    def plot_esd(self, name: str) -> Any:
        """One layer's spectrum with its power-law fit: a matplotlib Figure (needs ``keep_spectra=True``)."""
        from tbdiag.report.notebook import plot_esd
        return plot_esd(self, name)


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
    from tbdiag.io.checkpoint import adapter_folder

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
    from tbdiag.finetune.lora import LORA_FORMAT, adapter_specs, open_adapter

    if view == "weights":
        raise TbdiagError(f"{folder}: a LoRA adapter holds no full weights; analyse its updates (delta) or, with the "
                          "base model, the merged weights")
    if options.key:
        raise TbdiagError(f"{folder}: a LoRA adapter has no entries to choose from with key {options.key!r}; "
                          "leave the key out", cli={"leave the key out": "leave --key out"})
    adapter = open_adapter(folder)
    if view == "merged" and base is None:
        raise TbdiagError(f"{folder}: merging the adapter needs the base model it was trained on; pass it as base")
    base_specs = base_source = None
    if base is not None:  # merged: W + ΔW; delta: ΔW alone, each adapted layer checked against the base
        base_ckpt = open_checkpoint(base, trust_pickle=options.trust_pickle)
        # every matrix of the base, whatever the filters: they apply to the adapter's layers
        base_specs = plan_layers(base_ckpt, include_embeddings=True)[0]
        base_source = base_ckpt.source
    specs, skipped = adapter_specs(adapter, base_specs, merge=view == "merged", include=options.include,
                                   exclude=options.exclude)
    n_params = sum(math.prod(t.shape) for layer in adapter.layers for t in (layer.a, layer.b))
    return Planned(adapter.source, LORA_FORMAT, n_params, specs, skipped, base_source, view)
