"""From an analysis to TempBalance multipliers (``tbdiag.multipliers/v1``) and other per-unit allocations
(``tbdiag.allocation/v1``: weight decay, sparsity, LoRA ranks), and multipliers back from such files."""

from __future__ import annotations

import math
from pathlib import Path

from tbdiag.analysis.core import Analysis
from tbdiag.errors import TbdiagError
from tbdiag.allocation.maps import METRIC_FIELDS, unit_means, unit_multipliers
from tbdiag.allocation import allocators as allocate
from tbdiag.allocation.allocators import DEFAULT_FITS  # noqa: F401 - re-exported for the CLI
from tbdiag.allocation.selection import MIN_EVALS, TuneOptions, sparsity_units, tuned_layers

SCHEMA = "tbdiag.multipliers/v1"
TARGETS = ("lr", "weight_decay", "sparsity", "lora_rank")


def recommend(analysis: Analysis, *, map: str = "linear", min_ratio: float = 0.5, max_ratio: float = 1.5,
              metric: str = "alpha", unit: str = "layer", include_first_last: bool = False, min_evals: int = MIN_EVALS,
              include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), lr: float | None = None) -> dict:
    """The ``tbdiag.multipliers/v1`` document for an analysis.

    The tuned layers and their units follow `tbdiag.allocation.selection` — the rule `TempBalance` applies to
    the live model — so a file written here loads into `TempBalance.set_multipliers` with the same options.
    ``layers`` maps each unit (a layer, or a block with ``unit="block"``) to its alpha (the unit's mean), the
    chosen metric's value, its multiplier, the layers it covers, and, when ``lr`` is given, its learning rate.

    Raises:
        TbdiagError: an unknown metric or unit, or no layer to tune.
    """
    if metric not in METRIC_FIELDS:
        raise TbdiagError(f"metric {metric!r}: use one of {', '.join(METRIC_FIELDS)}")
    # embeddings never: the rows of an analysis made with include_embeddings are skipped, as TempBalance skips them
    tune = TuneOptions(unit=unit, include_first_last=include_first_last, min_evals=min_evals,
                       include=tuple(include), exclude=tuple(exclude))
    tuned = tuned_layers(analysis.layers, tune)
    if not tuned:
        raise _none_tuned(analysis, tune, "tune")
    rows = {r.name: r for r in analysis.layers}
    units = [t.unit for t in tuned]
    values = [getattr(rows[t.name], METRIC_FIELDS[metric]) for t in tuned]
    mult = unit_multipliers(units, values, map, min_ratio, max_ratio)
    alphas, means = unit_means(units, [rows[t.name].alpha for t in tuned]), unit_means(units, values)
    layers = {}
    for u in mult:
        entry = {"alpha": _or_none(alphas[u]), "value": _or_none(means[u]), "multiplier": mult[u],
                 "layers": [t.name for t in tuned if t.unit == u]}
        if lr is not None:
            entry["lr"] = lr * mult[u]
        layers[u] = entry
    return {"schema": SCHEMA, "source": analysis.source, "metric": metric, "map": map, "min_ratio": min_ratio,
            "max_ratio": max_ratio, "unit": unit, "fit": analysis.options.fit, "lr": lr,
            "layers": layers, "default_multiplier": 1.0}


def allocation(analysis: Analysis, target: str, *, unit: str = "layer", include_first_last: bool = False,
               min_evals: int = MIN_EVALS, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               **parameters: float) -> dict:
    """The ``tbdiag.allocation/v1`` document: per unit its alpha, the layers it covers, its parameter count
    and the target's value, on the units of the tuning rule (as `recommend`).

    Targets and their ``parameters``: ``weight_decay`` (AlphaDecay: ``map``, ``min_ratio``, ``max_ratio``,
    optional ``weight_decay`` — per unit ``multiplier`` and ``weight_decay``); ``sparsity`` (AlphaPruning:
    ``sparsity``, ``epsilon``, ``max_sparsity`` — per unit ``sparsity``); ``lora_rank`` (``budget``,
    ``beta``, ``r_min``, ``r_max``, optional ``lora_alpha`` — per unit ``rank``, and ``peft``:
    `LoraConfig` arguments whose keys are checked against the checkpoint's module names).

    Raises:
        TbdiagError: an unknown target, bad parameters, or no layer to allocate to.
    """
    if target not in TARGETS[1:]:
        raise TbdiagError(f"target {target!r}: use one of {', '.join(TARGETS[1:])} (lr: recommend)")
    if target == "lora_rank" and unit != "layer":
        raise TbdiagError("LoRA ranks are per module: use unit layer")
    tune = TuneOptions(unit=unit, include_first_last=include_first_last, min_evals=min_evals,
                       include=tuple(include), exclude=tuple(exclude))
    tuned = tuned_layers(analysis.layers, tune)
    if not tuned:
        raise _none_tuned(analysis, tune, "allocate to")
    rows = {r.name: r for r in analysis.layers}
    units = sparsity_units(tuned, unit) if target == "sparsity" else [t.unit for t in tuned]  # as prune allocates
    alphas = unit_means(units, [rows[t.name].alpha for t in tuned])
    groups = {u: {"alpha": _or_none(a), "layers": [t.name for t, v in zip(tuned, units) if v == u],
                  "n_params": sum(_numel(rows[t.name].shape) for t, v in zip(tuned, units) if v == u)}
              for u, a in alphas.items()}
    values = list(alphas.values())
    doc = {"schema": ALLOCATION_SCHEMA, "source": analysis.source, "target": target, "unit": unit,
           "fit": analysis.options.fit, "parameters": dict(parameters), "layers": groups}
    wd = parameters.get("weight_decay")
    if target == "weight_decay" and wd is not None and not (math.isfinite(wd) and wd >= 0):
        raise TbdiagError(f"weight_decay {wd}: must be a finite number ≥ 0; e.g. 0.05", cli={"weight_decay ": "--weight-decay "})
    if target == "weight_decay":
        mult = unit_multipliers(list(alphas), values, parameters.get("map", "linear"),
                                parameters.get("min_ratio", 0.5), parameters.get("max_ratio", 1.5))
        for u, g in groups.items():
            g.update(multiplier=mult[u], **({"weight_decay": wd * mult[u]} if wd is not None else {}))
    elif target == "sparsity":
        got = allocate.sparsity(values, [g["n_params"] for g in groups.values()], parameters["sparsity"],
                                parameters.get("epsilon", 0.3), parameters.get("max_sparsity", 0.99))
        for g, x in zip(groups.values(), got):
            g["sparsity"] = x
    else:
        ranks = allocate.lora_ranks(values, int(parameters["budget"]), parameters.get("beta", 1.0),
                                    int(parameters.get("r_min", 1)), _int_or_none(parameters.get("r_max")))
        for g, r in zip(groups.values(), ranks):
            g["rank"] = r
        modules = {m for r in analysis.layers for m in _prefixes(r.name)}  # a unit may be a row's parent
        doc["peft"] = allocate.peft_patterns(dict(zip(groups, ranks)), sorted(modules),
                                             lora_alpha=parameters.get("lora_alpha"),
                                             default_r=round(sum(ranks) / len(ranks)))
        _check_rank_bounds(analysis.source, groups, rows, ranks)  # after the checks of the arguments
    return doc


ALLOCATION_SCHEMA = allocate.SCHEMA


def _none_tuned(analysis: Analysis, tune: TuneOptions, what: str) -> TbdiagError:
    """Why no layer is left: the name patterns, or the rule's own limits."""
    if tune.include or tune.exclude:
        patterns = ", ".join([*(f"include {p!r}" for p in tune.include), *(f"exclude {p!r}" for p in tune.exclude)])
        names = ", ".join(r.name for r in analysis.layers[:3])
        return TbdiagError(f"{analysis.source}: no layer to {what} with {patterns} among its {len(analysis.layers)} "
                           f"layers ({names} …); check the patterns", cli={"include '": "--include '", "exclude '": "--exclude '"})
    return TbdiagError(f"{analysis.source}: no layer to {what} (Conv/Linear with ≥ {tune.min_evals} eigenvalues"
                       f"{', input and output layers excluded' if not tune.include_first_last else ''}); "
                       + ("include the first and last layers or " if not tune.include_first_last else "")
                       + "lower the eigenvalue minimum", cli={"include the first and last layers": "--include-first-last",
                                                               "the eigenvalue minimum": "--min-evals"})


def _check_rank_bounds(source: str, groups: dict, rows: dict, ranks: list[int]) -> None:
    """A LoRA update of an out × in matrix (a convolution's: out × in·kh·kw) has rank at most min(out, in):
    a larger rank only adds parameters. Refuse one (it comes from a budget too large for the layers)."""
    for (unit, group), r in zip(groups.items(), ranks):
        bound = min(min(rows[n].shape[0], math.prod(rows[n].shape[1:])) for n in group["layers"])
        if r > bound:
            raise TbdiagError(f"{source}: LoRA rank {r} for {unit} is above {bound}, the largest rank its matrix "
                              f"can hold; lower the budget, or cap every rank with r_max={bound}",
                              cli={"r_max=": "--r-max "})


def _prefixes(name: str) -> list[str]:
    """Every dotted prefix of a layer name, itself included: the modules holding it (``h.0.attn.c_attn`` for the
    split row ``h.0.attn.c_attn.q``, the stack for an expert)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _int_or_none(x: float | None) -> int | None:
    return None if x is None else int(x)


def _or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def load_multipliers(path: str | Path) -> dict[str, float]:
    """``{group name: multiplier}`` from a ``tbdiag.multipliers/v1`` file.

    Raises:
        TbdiagError: missing file, bad JSON, another schema, a malformed ``layers`` entry, or a multiplier
            that is not a positive finite number.
    """
    from tbdiag.analysis.export import read_json

    hint = "write one with tbdiag recommend"
    doc = read_json(path, hint)
    weight_decay_allocation = isinstance(doc, dict) and doc.get("schema") == ALLOCATION_SCHEMA \
        and doc.get("target") == "weight_decay"
    if not isinstance(doc, dict) or (doc.get("schema") != SCHEMA and not weight_decay_allocation):
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise TbdiagError(f"{path}: schema is {str(found)[:40]!r}, not {SCHEMA}; {hint}")
    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise TbdiagError(f"{path}: 'layers' is a {type(layers).__name__}, not an object of groups; {hint}")
    out = {}
    for name, entry in layers.items():
        m = entry.get("multiplier") if isinstance(entry, dict) else None
        if not _positive(m):
            raise TbdiagError(f"{path}: multiplier of {name[:80]!r} is {str(m)[:40]!r}, not a positive number; {hint}")
        out[name] = float(m)
    return out


def _positive(m: object) -> bool:
    """A positive finite number (not a bool; an integer too large for a float is not)."""
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        return False
    try:
        return math.isfinite(float(m)) and m > 0
    except OverflowError:
        return False
