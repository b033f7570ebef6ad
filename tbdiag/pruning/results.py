"""What `tbdiag.pruning.core.prune` is asked (`PruneOptions`) and what it gives back: per layer its allotment and the
zeros its output holds (`PrunedLayer`), and in all the `PruneResult` with its ``tbdiag.allocation/v1`` JSON.
See `tbdiag.pruning.core` for the rules these numbers follow."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from tbdiag import __version__
from tbdiag.errors import TbdiagError
from tbdiag.analysis.export import jsonable
from tbdiag.esd.powerlaw import FITS
from tbdiag.allocation.allocators import DEFAULT_FITS, SCHEMA
from tbdiag.allocation.allocators import sparsity as alpha_sparsities
from tbdiag.allocation.selection import MIN_EVALS, TuneOptions, UNITS

ALLOCATIONS = ("alpha", "uniform")


@dataclass(frozen=True)
class PruneOptions:
    """What decides the allocation (written into the allocation JSON as ``parameters``)."""

    sparsity: float
    allocation: str = "alpha"
    epsilon: float = 0.3
    max_sparsity: float = 0.99
    unit: str = "layer"
    include_first_last: bool = False
    min_evals: int = MIN_EVALS
    fit: str = DEFAULT_FITS["sparsity"]  # AlphaPruning's peak fit, as recommend --target sparsity
    peak_lower_bound_quirk: bool = False

    def __post_init__(self) -> None:
        alpha_sparsities([], [], self.sparsity, self.epsilon, self.max_sparsity)  # the allocator's checks, early
        for what, value, known in (("allocation", self.allocation, ALLOCATIONS), ("unit", self.unit, UNITS),
                                   ("fit", self.fit, tuple(FITS))):
            if value not in known:
                raise TbdiagError(f"{what} {value!r}: unknown; use one of {', '.join(known)}")
        TuneOptions(unit=self.unit, min_evals=self.min_evals)  # the selection rule's checks, early


@dataclass(frozen=True)
class Allotment:
    """A layer to prune and its allocated sparsity, before it is pruned."""

    name: str  # as `tbdiag.analyze` names it: the tensor name without ``.weight``; expert e: ``<stack>.<e>``
    tensor: str
    expert: int | None  # the slice ``[e]`` of a stacked expert tensor; None: the whole tensor
    unit: str  # the layer itself, or its block with unit ``block``
    alpha: float  # the layer's own alpha; nan when not fitted or not finite (``status`` says why)
    status: str  # the fit's status: ``ok``, why alpha is nan (``zero_matrix``, ``too_few_evals`` …), or ``uniform``
    unit_alpha: float  # the alpha the allocation read: the unit's mean of its finite alphas
    sparsity: float  # allocated
    n_params: int
    n_target: int  # round(sparsity · n_params): the zeros the layer is pruned to


@dataclass(frozen=True)
class PrunedLayer(Allotment):
    """A pruned layer: its allotment and the zeros the output holds."""

    n_pruned: int  # entries that are zero in the output, pre-existing zeros included: max(n_target, n_zero_input)
    n_zero_input: int  # entries that were zero in the input

    @property
    def realised(self) -> float:
        """The fraction of entries that are zero in the output."""
        return self.n_pruned / self.n_params

    @property
    def fallback(self) -> str:
        """Where a layer without a finite alpha took its sparsity from."""
        return "its block's mean alpha" if math.isfinite(self.unit_alpha) else "ratio 1, the middle of the range"


@dataclass(frozen=True)
class PruneResult:
    """What `prune` allocated and wrote; ``realised_mean`` is the parameter-weighted mean of the layers."""

    source: str
    out: str | None
    options: PruneOptions
    layers: tuple[PrunedLayer, ...]
    n_params: int
    n_pruned: int  # zeros of the output's pruned layers, pre-existing ones included
    realised_mean: float
    copied: tuple[str, ...] = ()  # a folder input's other files copied into the output folder (config, tokenizer …)
    left_out: tuple[tuple[str, str], ...] = ()  # and those not copied, (path, why): weights in other formats …

    @property
    def n_zero_input(self) -> int:
        """Zeros the pruned layers held before pruning (counted in ``n_pruned`` too)."""
        return sum(x.n_zero_input for x in self.layers)

    @property
    def fallbacks(self) -> tuple[PrunedLayer, ...]:
        """With the alpha allocation, the layers whose alpha is not finite (each has its ``status``)."""
        return tuple(x for x in self.layers if self.options.allocation == "alpha" and not math.isfinite(x.alpha))

    def fallback_notes(self) -> list[str]:
        """One phrase per layer in `fallbacks`: ``fc2 (zero_matrix): sparsity 0.5000 from ratio 1 …``."""
        return [f"{x.name} ({x.status}): sparsity {x.sparsity:.4f} from {x.fallback}" for x in self.fallbacks]

    def to_dict(self) -> dict:
        """The ``tbdiag.allocation/v1`` document of `recommend --target sparsity` (per unit its alpha, layers,
        ``n_params`` and ``sparsity``), plus what was pruned: per unit and in all ``n_pruned`` (zeros of the
        output) and ``n_zero_input``, the realised mean, and the ``fallbacks``. Non-finite alphas stay ``nan``
        (`tbdiag.analysis.export.jsonable` makes them ``null``)."""
        o = self.options
        alpha = o.allocation == "alpha"
        units: dict[str, dict] = {}
        for x in self.layers:
            unit = units.setdefault(x.unit, {"alpha": x.unit_alpha, "layers": [], "n_params": 0, "sparsity": x.sparsity,
                                             "n_pruned": 0, "n_zero_input": 0})
            unit["layers"].append(x.name)
            for key in ("n_params", "n_pruned", "n_zero_input"):
                unit[key] += getattr(x, key)
        parameters = {"sparsity": o.sparsity, "epsilon": o.epsilon if alpha else 0.0, "max_sparsity": o.max_sparsity,
                      "allocation": o.allocation, "include_first_last": o.include_first_last, "min_evals": o.min_evals,
                      "peak_lower_bound_quirk": o.peak_lower_bound_quirk}
        fallbacks = [{"layer": x.name, "status": x.status, "sparsity": x.sparsity, "from": x.fallback}
                     for x in self.fallbacks]
        return {"schema": SCHEMA, "tbdiag_version": __version__, "source": self.source, "target": "sparsity",
                "unit": o.unit, "fit": o.fit if alpha else None, "parameters": parameters, "layers": units,
                "n_params": self.n_params, "n_pruned": self.n_pruned,
                "n_zero_input": self.n_zero_input, "realised_mean": self.realised_mean,
                "fallbacks": fallbacks}

    def to_json(self) -> str:
        """The allocation document as JSON text (``null`` for what could not be computed)."""
        return json.dumps(jsonable(self.to_dict()), indent=1) + "\n"
