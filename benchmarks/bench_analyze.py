"""Time ``tbdiag.analyze`` against a straightforward implementation, the eigensolver alone and WeightWatcher.

    python benchmarks/bench_analyze.py [--rounds 3] [--models resnet18 minilm minilm+emb]

Models (weights at their PyTorch initialisation, seeded):
  resnet18    CIFAR-style ResNet18, 11.2M parameters, 3×3 convs up to 512 channels
  minilm      6 blocks of 384×384 q/k/v/o and 1536×384 / 384×1536 MLP matrices
  minilm+emb  the same plus the 30522×384 word embedding (tbdiag's --embeddings)

Per model and round, interleaved, it times:
  (c) floor      the eigensolver alone (float64 Gram + eigvalsh, grouped and shared over threads as in
                 analyze) on the same matrices, pre-loaded
  (a) tbdiag     analyze() end to end, for each fit (median, ks, peak)
  (b) naive      per-layer torch.linalg.svdvals (float64, like tbdiag) and, for ks/peak, a
                 Python loop over candidate xmin, written here from the formulas of docs/design.md ("The method, precisely")
  (s) search     the ks/peak fit alone on the same (pre-computed, float64) spectra: tbdiag's fit
                 against the Python loop of (b)
  (w) ww         WeightWatcher's default analyze(), when the package is installed (pip install -e '.[bench]')
and prints medians over rounds, the ratios against the targets, and how well the alphas agree.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

import torch
from torch import nn

from tbdiag.analysis.core import analyze
from tbdiag.analysis.measure import group_spectra, solve_groups
from tbdiag.io.checkpoint import open_checkpoint
from tbdiag.esd.layers import CONV_KINDS, as_matrices, plan_layers
from tbdiag.esd.powerlaw import FITS as TB_FITS
from tbdiag.train.models import MODELS

FITS = ("median", "ks", "peak")


class MiniLMShaped(nn.Module):
    """The matrices of a MiniLM-L6 (384 hidden, 1536 intermediate, 6 blocks); no forward pass needed."""

    def __init__(self, embeddings: bool) -> None:
        super().__init__()
        if embeddings:
            self.word_embeddings = nn.Embedding(30522, 384)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "query": nn.Linear(384, 384), "key": nn.Linear(384, 384), "value": nn.Linear(384, 384),
            "output": nn.Linear(384, 384), "intermediate": nn.Linear(384, 1536), "down": nn.Linear(1536, 384),
        }) for _ in range(6))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return MODELS["resnet18"](num_classes=100)
    return MiniLMShaped(embeddings=name == "minilm+emb")


# ---- (b) the straightforward approach -------------------------------------------------------------------

def naive_fit(evals: torch.Tensor, fit: str, zero_rtol: float) -> float:
    """Alpha from ascending eigenvalues, looping over candidates like the reference implementation."""
    nz = evals[evals > evals[-1] * zero_rtol]  # the same numerical-zero rule as tbdiag
    n_total = len(nz)
    log_nz = nz.log()
    if fit == "median":
        i = int(n_total / 2)
        n = n_total - i
        return float(1 + n / (log_nz[i:].sum() - n * log_nz[i]))
    lo, hi = -math.inf, math.inf
    if fit == "peak":
        h = torch.log10(nz)
        counts = torch.histc(h, 100, min=float(h.min()), max=float(h.max()))
        edges = torch.linspace(float(h.min()), float(h.max()), 101)
        xmin2 = 10 ** float(edges[int(torch.argmax(counts))])
        lo, hi = 0.95 * xmin2, 1.5 * xmin2
    best_d, best_alpha = math.inf, math.nan
    for i in range(n_total - 1):
        xmin = float(nz[i])
        if xmin < lo:
            continue
        if xmin > hi:
            break
        n = n_total - i
        alpha = float(1 + n / (log_nz[i:].sum() - n * log_nz[i]))
        if alpha > 1:
            seq = torch.arange(n, dtype=nz.dtype)
            d = float(torch.max(torch.abs(1 - (nz[i:] / xmin) ** (1 - alpha) - seq / n)))
            if d < best_d:
                best_d, best_alpha = d, alpha
    return best_alpha


def naive_analyze(stacks: dict[str, tuple[torch.Tensor, str]], fit: str) -> dict[str, float]:
    out = {}
    for name, (weight, kind) in stacks.items():
        s = torch.linalg.svdvals(as_matrices(weight, kind).double())  # (k, r), float64 like tbdiag
        evals = s.square().flatten().sort().values
        if kind in CONV_KINDS.values():
            evals = evals * 0.5
        out[name] = naive_fit(evals, fit, zero_rtol=min(weight.shape[:2]) * torch.finfo(torch.float64).eps)
    return out


# ---- harness ---------------------------------------------------------------------------------------------

def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def weightwatcher_alphas(model: nn.Module) -> dict[str, float] | None:
    try:
        import weightwatcher as ww
    except ImportError:
        return None
    logging.getLogger().setLevel(logging.WARNING)  # weightwatcher turns the root logger up to INFO
    details = ww.WeightWatcher(model=model).analyze()
    logging.getLogger().setLevel(logging.WARNING)
    return {str(r["longname"]): float(r["alpha"]) for _, r in details.iterrows()}


def agreement(a: dict[str, float], b: dict[str, float]) -> str:
    common = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    if not common:
        return "no common layers"
    diffs = [abs(a[k] - b[k]) for k in common]
    rel = [abs(a[k] - b[k]) / abs(b[k]) for k in common]
    return (f"{len(common)} layers: max |Δalpha| {max(diffs):.2e}, median |Δalpha| {statistics.median(diffs):.2e}, "
            f"max rel {max(rel):.2e}")


def bench(name: str, rounds: int, with_ww: bool) -> None:
    model = build(name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    include_emb = name == "minilm+emb"
    layers, _ = plan_layers(open_checkpoint(state), include_embeddings=include_emb)
    stacks = {spec.name: (spec.ref.load(), spec.kind) for spec in layers}
    mats = [as_matrices(w, k) for w, k in stacks.values()]
    print(f"\n== {name}: {sum(v.numel() for v in state.values()) / 1e6:.1f}M weights, {len(layers)} layers, "
          f"{sum(s.n_evals for s in layers)} eigenvalues; torch threads {torch.get_num_threads()}")
    matrices = dict(zip((spec.name for spec in layers), mats))
    groups = list(solve_groups(layers, torch.get_num_threads(), torch.device("cpu"), torch.float64))

    def floor() -> list[torch.Tensor]:  # the eigensolver alone, on pre-loaded matrices, grouped as analyze does
        cpu = torch.device("cpu")
        return [ev for g in groups for ev in group_spectra(g, lambda s: matrices[s.name], cpu, torch.float64)]

    spectra = floor()
    spectra = [ev[ev > ev[-1] * min(m.shape[1:]) * torch.finfo(ev.dtype).eps] for ev, m in zip(spectra, mats)]
    times: dict[str, list[float]] = {}
    alphas: dict[str, dict[str, float]] = {}
    ww_alphas = None
    for r in range(rounds):
        times.setdefault("floor", []).append(timed(floor)[0])
        for fit in ("ks", "peak"):
            t, _ = timed(lambda: [naive_fit(ev, fit, 0.0) for ev in spectra])
            times.setdefault(f"search {fit} naive", []).append(t)
            t, _ = timed(lambda: [TB_FITS[fit](ev) for ev in spectra])
            times.setdefault(f"search {fit} tbdiag", []).append(t)
        for fit in FITS:
            t, res = timed(lambda: analyze(state, fit=fit, device="cpu", include_embeddings=include_emb))
            times.setdefault(f"tbdiag {fit}", []).append(t)
            alphas[f"tbdiag {fit}"] = {row.name: row.alpha for row in res.layers}
            t, res = timed(lambda: naive_analyze(stacks, fit))
            times.setdefault(f"naive {fit}", []).append(t)
            alphas[f"naive {fit}"] = res
        t, res = timed(lambda: analyze(state, fit="ks", device="cpu", precision="float32",
                                       include_embeddings=include_emb))
        times.setdefault("tbdiag ks f32", []).append(t)
        alphas["tbdiag ks f32"] = {row.name: row.alpha for row in res.layers}
        if with_ww:
            t, ww_alphas = timed(lambda: weightwatcher_alphas(model))
            if ww_alphas is None:
                with_ww = False
            else:
                times.setdefault("ww default", []).append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:19s} {v * 1000:9.1f} ms   (rounds: {', '.join(f'{x * 1000:.0f}' for x in times[k])})")
    print("  ratios (median times):")
    for fit in FITS:
        print(f"    tbdiag {fit:6s} / floor      = {med[f'tbdiag {fit}'] / med['floor']:.2f}   (target ≤ 1.3)")
    for fit in FITS:
        print(f"    naive {fit:6s} / tbdiag {fit:6s} = {med[f'naive {fit}'] / med[f'tbdiag {fit}']:.1f}×  end to end")
    for fit in ("ks", "peak"):  # the fit alone, on the same spectra
        ours, theirs = med[f"search {fit} tbdiag"], med[f"search {fit} naive"]
        print(f"    xmin search {fit:4s}: naive loop {theirs * 1000:.0f} ms / tbdiag {ours * 1000:.1f} ms = "
              f"{theirs / ours:.1f}×" + ("   (target ≥ 10×)" if fit == "ks" else ""))
    if "ww default" in med:
        for fit in FITS:
            print(f"    ww default / tbdiag {fit:6s} = {med['ww default'] / med[f'tbdiag {fit}']:.1f}×   (target ≥ 4×)")
        print(f"    ww default / tbdiag ks f32 = {med['ww default'] / med['tbdiag ks f32']:.1f}×   (--precision float32)")
    print("  alpha agreement:")
    for fit in FITS:
        print(f"    tbdiag {fit} vs naive {fit}: {agreement(alphas[f'tbdiag {fit}'], alphas[f'naive {fit}'])}")
    print(f"    tbdiag ks float32 vs float64: {agreement(alphas['tbdiag ks f32'], alphas['tbdiag ks'])}")
    if ww_alphas:
        for fit in ("ks", "peak"):
            print(f"    tbdiag {fit} vs ww default: {agreement(alphas[f'tbdiag {fit}'], ww_alphas)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["resnet18", "minilm", "minilm+emb"])
    parser.add_argument("--no-ww", action="store_true", help="skip WeightWatcher even when installed")
    args = parser.parse_args()
    for name in args.models:
        bench(name, args.rounds, with_ww=not args.no_ww)


if __name__ == "__main__":
    main()
