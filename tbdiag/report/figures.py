"""Matplotlib figures of the reports, drawn with the object API (no pyplot state) and returned as PNG
data URIs so the HTML file holds everything it shows."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

BANDS = ((0.0, 2.0, "#f4c7c3", "α < 2: possibly over-trained"), (2.0, 6.0, "#d9ead3", "2–6: typical"),
         (6.0, math.inf, "#fce8b2", "α > 6: possibly under-trained"))
DPI = 72


def plain(text: str) -> str:
    """A string from a file (a layer name, a path) as literal figure text: ``$`` would start mathtext."""
    return str(text).replace("$", r"\$")


def _plain_all(texts: Sequence[str]) -> list[str]:
    return [plain(t) for t in texts]


def to_data_uri(fig: Figure, dpi: int = DPI, tight: bool = True) -> str:
    """Render a figure to a base64 PNG data URI (``tight`` trims margins at the cost of a second draw)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values: Sequence) -> np.ndarray:
    return np.array([v if v is not None else np.nan for v in values], dtype=float)


def alpha_by_layer(names: Sequence[str], alphas: Sequence, errors: Sequence, bands: bool = True) -> str:
    """Alpha per layer in model order with ±alpha_err error bars, over the HT-SR reading bands when
    ``bands`` (they are calibrated on the ks fit)."""
    a, e = _finite(alphas), _finite(errors)
    width = min(16.0, max(6.0, 0.18 * len(names)))
    fig = Figure(figsize=(width, 3.2))
    ax = fig.add_subplot()
    top = max(8.0, float(np.nanmax(a + np.nan_to_num(e))) * 1.05) if np.isfinite(a).any() else 8.0
    for lo, hi, color, label in BANDS if bands else ():
        ax.axhspan(lo, min(hi, top), color=color, alpha=0.6, label=label, lw=0)
    x = np.arange(len(names))
    ax.errorbar(x, a, yerr=np.nan_to_num(e), fmt="o", ms=3, color="#1f4e79", ecolor="#7f9fbf", capsize=2)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(min(1.0, float(np.nanmin(a)) - 0.2) if np.isfinite(a).any() else 1.0, top)
    ax.set_ylabel("alpha")
    if len(names) <= 60:
        ax.set_xticks(x, _plain_all(names), rotation=90, fontsize=7)
    else:
        ax.set_xlabel(f"layer index (model order, {len(names)} layers)")
    if bands:
        ax.legend(loc="upper right", fontsize=7, ncols=3)
    return to_data_uri(fig)


def esd(evals: np.ndarray, row: dict, rand: np.ndarray | None = None) -> str:
    """One layer's ESD: log–log density with the fitted power law from xmin, and a linear-scale view; the MP
    bulk edge λ₊ (dotted) when fitted; with ``rand`` (the randomised ESD) both panels overlay it, with its
    bulk edge, so what training added stands out from what a shuffle of the same entries gives.

    Histograms are drawn as one ``stairs`` artist each (not a patch per bin): a report of hundreds of
    layers renders in seconds.
    """
    fig = Figure(figsize=(6.4, 2.2))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.88, wspace=0.25)
    ax_log, ax_lin = fig.subplots(1, 2)
    positive = evals[evals > 0]
    both = np.concatenate([positive, rand[rand > 0]]) if rand is not None else positive
    if len(positive) >= 2 and both.max() > both.min():
        edges = np.geomspace(both.min(), both.max(), min(60, max(10, len(positive) // 8)))
        density, _ = np.histogram(positive, bins=edges, density=True)
        ax_log.stairs(np.where(density > 0, density, np.nan), edges, fill=True, color="#6fa8dc", label="ESD")
        if rand is not None:
            rdensity, _ = np.histogram(rand[rand > 0], bins=edges, density=True)
            ax_log.stairs(np.where(rdensity > 0, rdensity, np.nan), edges, color="#8e44ad", lw=1.2, label="shuffled")
        ax_log.set_xscale("log")
        ax_log.set_yscale("log")
        _power_law(ax_log, row, positive)
        ax_log.legend(fontsize=6)
    lin = np.concatenate([evals, rand]) if rand is not None else evals
    counts, edges = np.histogram(evals, bins=np.histogram_bin_edges(lin, bins=min(60, max(10, len(evals) // 8))))
    ax_lin.stairs(counts, edges, fill=True, color="#93c47d")
    if rand is not None:
        ax_lin.stairs(np.histogram(rand, bins=edges)[0], edges, color="#8e44ad", lw=1.2)
    for ax in (ax_log, ax_lin):
        for key, color in (("mp_bulk_max", "#38761d"), ("rand_bulk_max", "#8e44ad")):
            if row.get(key) is not None:
                ax.axvline(row[key], color=color, ls=":", lw=1)
    for ax, title in ((ax_log, "log–log ESD"), (ax_lin, "linear scale; dotted: MP bulk edge")):
        ax.text(0.5, 1.03, title, transform=ax.transAxes, ha="center", fontsize=8)
        _light_ticks(ax)
        ax.set_xlabel("eigenvalue", fontsize=7)
    return to_data_uri(fig, tight=False)


def _power_law(ax, row: dict, positive: np.ndarray) -> None:  # noqa: ANN001 - a matplotlib Axes
    """The fitted power law from xmin, and xmin, when the row has a fit."""
    alpha, xmin, n_tail = row.get("alpha"), row.get("xmin"), row.get("n_tail") or 0
    if alpha is not None and xmin is not None and n_tail:
        xs = np.geomspace(xmin, positive.max(), 50)
        fitted = n_tail / len(positive) * (alpha - 1) / xmin * (xs / xmin) ** (-alpha)
        ax.plot(xs, fitted, color="#cc0000", lw=1.5, label=f"α = {alpha:.2f}")
        ax.axvline(xmin, color="#cc0000", ls="--", lw=1, label="xmin")


def _light_ticks(ax) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Few ticks, no minor ticks, plain "1e-02" log labels: tick layout and mathtext parsing are most of a
    small figure's drawing time."""
    ax.minorticks_off()
    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "log":
            axis.set_major_locator(LogLocator(numticks=4))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        else:
            axis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=6)


def esd_overlay(spectra: Sequence[tuple[str, np.ndarray]]) -> str:
    """ESDs of one layer from several checkpoints on shared log–log axes."""
    fig = Figure(figsize=(4.2, 2.4))
    ax = fig.add_subplot()
    positive = [ev[ev > 0] for _, ev in spectra]
    allv = np.concatenate([p for p in positive if len(p)]) if any(len(p) for p in positive) else np.array([1.0])
    bins = np.geomspace(allv.min(), allv.max() * 1.0001, 40)
    for (label, _), p in zip(spectra, positive):
        if len(p):
            ax.hist(p, bins=bins, density=True, histtype="step", lw=1.3, label=plain(label))
    ax.set_xscale("log")
    ax.set_yscale("log")
    _light_ticks(ax)
    ax.set_xlabel("eigenvalue", fontsize=7)
    ax.legend(fontsize=6)
    return to_data_uri(fig)


def grouped_alphas(names: Sequence[str], series: Sequence[tuple[str, Sequence]], bands: bool = True) -> str:
    """Alpha per layer for several checkpoints side by side (one marker series each), over the HT-SR bands
    when ``bands``."""
    width = min(16.0, max(6.0, 0.18 * len(names)))
    fig = Figure(figsize=(width, 3.2))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    for i, (label, alphas) in enumerate(series):
        ax.plot(x + (i - (len(series) - 1) / 2) * 0.12, _finite(alphas), "o-", ms=3, lw=0.8, label=plain(label))
    finite = np.concatenate([_finite(a) for _, a in series]) if series else np.array([])
    finite = finite[np.isfinite(finite)]
    top = max(8.0, float(finite.max()) * 1.05) if len(finite) else 8.0
    for lo, hi, color, _ in BANDS if bands else ():
        ax.axhspan(lo, min(hi, top), color=color, alpha=0.35, lw=0)
    ax.set_ylim(min(1.0, float(finite.min()) - 0.2) if len(finite) else 1.0, top)
    ax.set_ylabel("alpha")
    if len(names) <= 60:
        ax.set_xticks(x, _plain_all(names), rotation=90, fontsize=7)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, label: str = "alpha") -> str:
    """A rows × columns heat map (nan shown blank)."""
    fig = Figure(figsize=(min(14.0, 2.5 + 0.5 * len(cols)), min(18.0, 1.5 + 0.16 * len(rows))))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(np.arange(len(cols)), _plain_all(cols), rotation=60, fontsize=7, ha="right")
    if len(rows) <= 80:
        ax.set_yticks(np.arange(len(rows)), _plain_all(rows), fontsize=6)
    ax.set_title(plain(title), fontsize=9)
    return to_data_uri(fig)


def curves(runs: Sequence[tuple[str, list[dict]]]) -> str:
    """Loss and accuracy per epoch (train dashed, test solid) for one or several runs."""
    fig = Figure(figsize=(9.0, 2.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, history in runs:
        ep = [r["epoch"] for r in history]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            line, = ax.plot(ep, [r[f"test_{key}"] for r in history], lw=1.4, label=f"{plain(label)} test")
            ax.plot(ep, [r[f"train_{key}"] for r in history], lw=1, ls="--", color=line.get_color(),
                    label=f"{plain(label)} train")
    ax_loss.set_title("loss", fontsize=9)
    ax_acc.set_title("accuracy", fontsize=9)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    ax_acc.legend(fontsize=6)
    return to_data_uri(fig)


def learning_rates(history: list[dict]) -> str:
    """The global lr and every tuned layer's lr per epoch."""
    fig = Figure(figsize=(9.0, 2.6))
    ax = fig.add_subplot()
    ep = [r["epoch"] for r in history]
    names = list(history[-1].get("layers", {})) if history else []
    for name in names:
        ax.plot(ep, [r["layers"].get(name, {}).get("lr") or np.nan for r in history], lw=0.7, alpha=0.7)
    ax.plot(ep, [r["lr"] for r in history], color="black", lw=2, label="global lr")
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("learning rate", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, title=f"thin lines: {len(names)} tuned layers" if names else None, title_fontsize=7)
    return to_data_uri(fig)
