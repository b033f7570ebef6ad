"""Rich tables of analyses for the terminal.

Strings from files (sources, layer names, warnings) go in as `rich.text.Text`, never as markup: a layer
named ``blk[/].fc`` is shown as it is.
"""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text

from tbdiag.analysis.core import Analysis
from tbdiag.cli.common import safe
from tbdiag.esd.metrics import BANDS_FIT, OVER_TRAINED_BELOW, UNDER_TRAINED_ABOVE, band_flags
from tbdiag.finetune.lora import LORA_FORMAT


def fmt(x: float, digits: int = 3) -> str:
    """A number for a table cell: ``-`` for nan, scientific for very large or small values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _alpha_cell(alpha: float, bands: bool) -> Text:
    """Alpha, coloured by the HT-SR bands when they apply to the fit (``bands``)."""
    style = "" if not bands else "red" if alpha < OVER_TRAINED_BELOW else "yellow" if alpha > UNDER_TRAINED_ABOVE else ""
    return Text(fmt(alpha), style=style)


def analysis_table(a: Analysis) -> Table:
    """One row per layer, in model order."""
    title = safe(f"{a.source}{_view_text(a)}  ({a.format}, {a.n_params:,} weights, fit={a.options.fit})")
    table = Table(title=title, title_justify="left", header_style="bold")
    rand = a.options.randomize
    columns = ["layer", "kind", "shape", "#eigs", "alpha", "±err", "D", "n_tail", "λ_max", "alpha_w", "stable_rank",
               "spikes", "mp_softrank", "entropy", *(["rand_dist", "traps"] if rand else []), "status"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "kind", "shape", "status") else "right",
                         no_wrap=col == "layer")
    bands = a.options.fit == BANDS_FIT
    for r in a.layers:
        status = r.status if not r.warning else f"{r.status} ({r.warning})"
        extra = [fmt(r.rand_distance), _count(r.num_traps)] if rand else []
        table.add_row(safe(r.name), r.kind, "×".join(map(str, r.shape)), str(r.n_evals), _alpha_cell(r.alpha, bands),
                      fmt(r.alpha_err), fmt(r.D), str(r.n_tail or "-"), fmt(r.lambda_max), fmt(r.alpha_weighted),
                      fmt(r.stable_rank, 1), _count(r.num_spikes), fmt(r.mp_softrank), fmt(r.matrix_entropy), *extra,
                      Text(status))
    return table


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def _view_text(a: Analysis) -> str:
    """What the rows describe, when not the checkpoint's own weights."""
    if a.view == "delta":
        if a.format == LORA_FORMAT:
            return "  ΔW = s·B·A (LoRA updates)" + (f", checked against base {a.base}" if a.base else "")
        return f"  ΔW = W − W_base, base {a.base}"
    if a.view == "merged":
        return f"  W_base + ΔW, base {a.base}"
    return ""


def summary_text(a: Analysis) -> Text:
    """Summary lines under the table: alpha statistics and the layers HT-SR flags."""
    s = a.summary
    text = Text()
    text.append(f"{s['n_fitted']}/{s['n_layers']} layers fitted · mean alpha {fmt(s['alpha_mean'])} · "
                f"median alpha {fmt(s['alpha_median'])} · alpha spread (std) {fmt(s.get('alpha_std', math.nan))} · "
                f"mean weighted alpha {fmt(s['alpha_weighted_mean'])}\n")
    flags = band_flags(s, a.options.fit)
    if flags is None:
        text.append(f"HT-SR bands (alpha < {OVER_TRAINED_BELOW:g} possibly over-trained, > {UNDER_TRAINED_ABOVE:g} "
                    f"possibly under-trained) not shown: they are calibrated on the {BANDS_FIT} fit, these alphas "
                    f"come from {a.options.fit} (--fit {BANDS_FIT} to see them)\n")
    for names, label, style in zip(flags or (), (f"possibly over-trained (alpha < {OVER_TRAINED_BELOW:g})",
                                                 f"possibly under-trained (alpha > {UNDER_TRAINED_ABOVE:g})"),
                                   ("red", "yellow")):
        shown = ", ".join(names[:8]) + (f" … (+{len(names) - 8})" if len(names) > 8 else "")
        text.append(f"{BANDS_FIT} fit, {label}: {len(names)}", style=style if names else "")
        text.append(f"  {shown}\n" if names else "\n")
    skipped = s.get("skipped", {})
    if skipped.get("embedding"):
        text.append(f"{skipped['embedding']} embedding matrices not analysed (--embeddings to include)\n")
    return text


def plan_table(plan) -> Table:  # noqa: ANN001 - tbdiag.analysis.plan.Plan, imported lazily
    """The analysis plan: one row per layer with its read size and estimated time, and totals."""
    against = "checked against" if plan.format == LORA_FORMAT else "against"  # an adapter's ΔW is s·B·A
    what = {"delta": f", ΔW {against} {plan.base}" if plan.base else ", ΔW", "merged": f", merged into {plan.base}"}
    table = Table(title=safe(f"plan: {plan.source}{what.get(plan.view, '')} ({plan.format}, {len(plan.layers)} "
                             f"layer{'s' if len(plan.layers) != 1 else ''}, device {plan.device})"),
                  title_justify="left", header_style="bold", show_footer=True)
    total_s = plan.seconds or 1.0
    table.add_column("layer", footer="total", no_wrap=True)
    table.add_column("kind")
    table.add_column("shape")
    table.add_column("#eigs", justify="right", footer=str(sum(layer.n_evals for layer in plan.layers)))
    table.add_column("MB", justify="right", footer=f"{plan.bytes / 1e6:,.1f}")
    table.add_column("est. s", justify="right", footer=f"{plan.seconds:.1f}")
    table.add_column("share", justify="right")
    for layer in plan.layers:
        table.add_row(safe(layer.name), layer.kind, "×".join(map(str, layer.shape)), str(layer.n_evals),
                      f"{layer.bytes / 1e6:,.1f}", f"{layer.seconds:.2f}", f"{100 * layer.seconds / total_s:.1f}%")
    return table


def _signed(x: float | None) -> Text:
    """A change, coloured: up yellow, down green, ``-`` when it cannot be computed."""
    if x is None or not math.isfinite(x):
        return Text("-")
    return Text(f"{x:+.3f}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:+.2e}", style="yellow" if x > 0 else "green" if x < 0 else "")


def diff_table(doc: dict, top: int = 0) -> Table:
    """A ``tbdiag.diff/v1`` document: one row per common layer, largest change of alpha first."""
    a, b = doc["a"], doc["b"]
    title = safe(f"{a['source']} ({a['view']}) → {b['source']} ({b['view']}): {len(doc['layers'])} common layers, "
                 f"sorted by |Δalpha|")
    table = Table(title=title, title_justify="left", header_style="bold")
    for col in ("layer", "alpha A", "alpha B", "Δalpha", "Δalpha_w", "Δlog_norm", "Δlog_λmax", "Δstable_rank",
                "Δmp_softrank", "Δspikes", "Δentropy"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=col == "layer")
    shown = doc["layers"][:top] if top else doc["layers"]
    for row in shown:
        d = row["delta"]
        table.add_row(safe(row["name"]), fmt(row["a"]["alpha"]), fmt(row["b"]["alpha"]),
                      *(_signed(d[m]) for m in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm",
                                                "stable_rank", "mp_softrank", "num_spikes", "matrix_entropy")))
    if len(shown) < len(doc["layers"]):
        table.caption = f"{len(doc['layers']) - len(shown)} more rows in the JSON (--top 0 shows all)"
    for side, names in (("A", doc["only_a"]), ("B", doc["only_b"])):
        if names:
            more = f" … (+{len(names) - 5})" if len(names) > 5 else ""
            table.caption = (table.caption or "") + f"\nonly in {side}: {', '.join(names[:5])}{more}"
    return table
