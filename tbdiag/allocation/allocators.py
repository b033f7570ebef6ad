"""Allocators: per-layer budgets from alpha, on the units of the one tuning rule (``tbdiag.allocation/v1``).

- **Sparsity** (AlphaPruning, Lu et al., NeurIPS 2024): r_l = (α_l − α_min)/(α_max − α_min)·2ε + (1 − ε),
  s_l = S·r_l·Σn/Σ(n·r_l) so that the parameter-weighted mean sparsity is exactly S. As in the paper,
  heavier-tailed (lower-alpha, better-trained) layers keep more weights: higher alpha → more pruned.
  Layers that would pass ``max_sparsity`` are held there and the rest rescaled (still exactly S).
- **LoRA ranks** (AlphaLoRA-style): r_l ∝ α_l^β normalised to a rank budget, kept within [r_min, r_max]
  and rounded by largest remainders so the ranks sum to the budget exactly; higher alpha → more rank.
- **Weight decay** (AlphaDecay) and **learning rate** (TempBalance) use the maps of `maps` directly.
A unit whose alpha is not finite takes the neutral value (r = 1 for sparsity, the mean for ranks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from tbdiag.errors import TbdiagError
from tbdiag.finetune.lora_config import pattern_matches

SCHEMA = "tbdiag.allocation/v1"


# The fit each target reads by default: TempBalance's (median) for rates, decay and ranks; AlphaPruning's (peak)
# for sparsity, so that an allocation written for any pruner is the one `tbdiag.prune` applies.
DEFAULT_FITS = {"lr": "median", "weight_decay": "median", "lora_rank": "median", "sparsity": "peak"}

def _finite_or(values: Sequence[float], fill: float) -> list[float]:
    return [v if math.isfinite(v) else fill for v in values]


def _fill_budget(weights: Sequence[float], sizes: Sequence[float], total: float, lo: float, hi: float) -> list[float]:
    """x_l = c·w_l (one c) with Σ n_l·x_l = total, each x_l kept within [lo, hi] (held units leave the scaling)."""
    held: dict[int, float] = {}
    for _ in range(len(weights) + 1):
        free = [i for i in range(len(weights)) if i not in held]
        rest = total - sum(sizes[i] * held[i] for i in held)
        scale = sum(sizes[i] * weights[i] for i in free)
        c = rest / scale if scale > 0 else 0.0
        out = [held.get(i, c * weights[i]) for i in range(len(weights))]
        over = {i: hi for i in free if out[i] > hi + 1e-12}
        under = {i: lo for i in free if out[i] < lo - 1e-12}
        if not over and not under:
            return out
        held.update(over or under)
    raise TbdiagError("no allocation meets the budget within the bounds")


def sparsity(alphas: Sequence[float], sizes: Sequence[int], target: float, epsilon: float = 0.3,
             max_sparsity: float = 0.99) -> list[float]:
    """Per-unit sparsities with parameter-weighted mean exactly ``target`` (AlphaPruning).

    Args:
        alphas: each unit's alpha (``nan`` allowed).
        sizes: each unit's number of prunable parameters.
        target: mean sparsity S, 0 ≤ S < 1.
        epsilon: spread ε of the ratios, 0 ≤ ε < 1 (0: uniform).
        max_sparsity: no unit is pruned beyond this.

    Raises:
        TbdiagError: S, ε or the bound out of range, or S above the bound.
    """
    if not 0 <= target < 1:
        raise TbdiagError(f"sparsity {target}: must be at least 0 and below 1; e.g. 0.7", cli={"sparsity ": "--sparsity "})
    if not 0 <= epsilon < 1:
        raise TbdiagError(f"epsilon {epsilon}: must be at least 0 and below 1; e.g. 0.3 (0: uniform)",
                          cli={"epsilon ": "--epsilon "})
    if not target <= max_sparsity < 1:
        raise TbdiagError(f"max sparsity {max_sparsity}: must lie between the target {target} and 1; e.g. 0.99",
                          cli={"max sparsity ": "--max-sparsity "})
    finite = [a for a in alphas if math.isfinite(a)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    ratios = [((a - lo) / (hi - lo) * 2 * epsilon + 1 - epsilon) if hi > lo and math.isfinite(a) else 1.0
              for a in alphas]
    return _fill_budget(ratios, [float(n) for n in sizes], target * sum(sizes), 0.0, max_sparsity)


def lora_ranks(alphas: Sequence[float], budget: int, beta: float = 1.0, r_min: int = 1,
               r_max: int | None = None) -> list[int]:
    """Per-unit LoRA ranks r_l ∝ α_l^β, each within [r_min, r_max], summing to ``budget`` exactly.

    Raises:
        TbdiagError: a budget below n·r_min or above n·r_max, bad bounds, or β not finite or beyond ±8.
    """
    n = len(alphas)
    r_max = budget if r_max is None else r_max
    if n == 0 or not 1 <= r_min <= r_max:
        raise TbdiagError(f"ranks {r_min}–{r_max} for {n} layers: need 1 ≤ r_min ≤ r_max and at least one layer; "
                          "lower r_min or raise r_max", cli={"r_min": "--r-min", "r_max": "--r-max"})
    if not math.isfinite(beta) or abs(beta) > 8:
        raise TbdiagError(f"beta {beta}: must be a finite exponent between -8 and 8; e.g. 1 (ranks ∝ alpha) or 0 "
                          "(uniform)", cli={"beta ": "--beta "})
    if not n * r_min <= budget <= n * r_max:
        raise TbdiagError(f"rank budget {budget}: {n} layers need between {n * r_min} (r_min {r_min}) and "
                          f"{n * r_max} (r_max {r_max}); change the budget or the bounds",
                          cli={"rank budget": "--budget", "r_min": "--r-min", "r_max": "--r-max"})
    finite = [a for a in alphas if math.isfinite(a) and a > 0]
    mean = sum(finite) / len(finite) if finite else 1.0
    weights = [a ** beta for a in _finite_or([a if a > 0 else math.nan for a in alphas], mean)]
    real = _fill_budget(weights, [1.0] * n, float(budget), float(r_min), float(r_max))
    ranks = [max(r_min, min(r_max, math.floor(x + 1e-9))) for x in real]
    order = sorted(range(n), key=lambda i: (-(real[i] - ranks[i]), i))  # largest remainders first
    for i in order:
        if sum(ranks) >= budget:
            break
        if ranks[i] < r_max:
            ranks[i] += 1
    for i in reversed(order):
        if sum(ranks) <= budget:
            break
        if ranks[i] > r_min:
            ranks[i] -= 1
    return ranks


def peft_patterns(ranks: dict[str, int], module_names: Iterable[str], *, lora_alpha: float | None = None,
                  default_r: int = 8) -> dict:
    """``LoraConfig`` arguments: ``rank_pattern`` (and ``alpha_pattern`` keeping lora_alpha/r constant when
    ``lora_alpha`` is given) keyed ``^module.name$``, each checked to match exactly one module the way PEFT
    matches (``(.*\\.)?(key)$`` on every module name, first key wins).

    Raises:
        TbdiagError: a key that matches no module or several, or a ``lora_alpha`` that is not a finite
            positive number.
    """
    if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise TbdiagError(f"lora_alpha {lora_alpha}: must be a finite number > 0; e.g. 16",
                          cli={"lora_alpha ": "--lora-alpha "})
    names = list(module_names)
    rank_pattern, alpha_pattern = {}, {}
    for module, r in ranks.items():
        key = f"^{re.escape(module)}$"
        hits = [m for m in names if pattern_matches(key, m)]
        if len(hits) != 1:
            raise TbdiagError(f"LoRA key {key}: matches {len(hits)} modules of the model, not one; the ranks were "
                              "computed for another model or naming (pass the model the adapter will wrap)")
        rank_pattern[key] = r
        if lora_alpha is not None:
            alpha_pattern[key] = lora_alpha * r / default_r
    exact = "|".join(re.escape(m) for m in sorted(ranks))
    out = {"r": default_r, "target_modules": f"^({exact})$", "rank_pattern": rank_pattern}
    if lora_alpha is not None:
        out.update(lora_alpha=lora_alpha, alpha_pattern=alpha_pattern)
    return out
