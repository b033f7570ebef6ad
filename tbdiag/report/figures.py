"""Matplotlib figures of the reports, drawn with the object API (no pyplot state) and returned as PNG
data URIs so the HTML file holds everything it shows. The per-layer figures that name what is under the
pointer are in `tbdiag.report.hover` and `tbdiag.report.alphas`."""

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
WIDE_IN, WIDE_DPI = 12.8, 100  # the wide figures: 1280 px, the content column at its native resolution


class NotebookFigure(Figure):
    """A `Figure` that shows itself in a notebook (``_repr_png_``) without pyplot or an inline backend."""

    def _repr_png_(self) -> bytes:
        FigureCanvasAgg(self)
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=WIDE_DPI, bbox_inches="tight")
        return buf.getvalue()


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


def esd(evals: np.ndarray, row: dict, rand: np.ndarray | None = None) -> str:
    """`draw_esd` as a PNG data URI."""
    fig = Figure(figsize=(6.4, 2.2))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.88, wspace=0.25)
    draw_esd(fig, evals, row, rand)
    return to_data_uri(fig, tight=False)


def draw_esd(fig: Figure, evals: np.ndarray, row: dict, rand: np.ndarray | None = None) -> None:
    """One layer's ESD: log–log density with the fitted power law from xmin, and a linear-scale view; the MP
    bulk edge λ₊ (dotted) when fitted; with ``rand`` (the randomised ESD) both panels overlay it, with its
    bulk edge, so what training added stands out from what a shuffle of the same entries gives.

    Histograms are drawn as one ``stairs`` artist each (not a patch per bin): a report of hundreds of
    layers renders in seconds.
    """
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


def curves(runs: Sequence[tuple[str, list[dict]]]) -> str:
    """Loss and accuracy per epoch (train dashed, test solid) for one or several runs."""
    fig = Figure(figsize=(WIDE_IN, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, history in runs:
        ep = [r["epoch"] for r in history]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            line, = ax.plot(ep, [r[f"test_{key}"] for r in history], lw=1.4, label=f"{plain(label)} test")
            ax.plot(ep, [r[f"train_{key}"] for r in history], lw=1, ls="--", color=line.get_color(),
                    label=f"{plain(label)} train")
    ax_loss.set_title("loss", fontsize=11)
    ax_acc.set_title("accuracy", fontsize=11)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch", fontsize=10)
        ax.tick_params(labelsize=9)
    ax_acc.legend(fontsize=9)
    return to_data_uri(fig, dpi=WIDE_DPI)


def learning_rates(history: list[dict]) -> str:
    """The global lr and every tuned layer's lr per epoch."""
    fig = Figure(figsize=(WIDE_IN, 3.4))
    ax = fig.add_subplot()
    ep = [r["epoch"] for r in history]
    names = list(history[-1].get("layers", {})) if history else []
    for name in names:
        ax.plot(ep, [r["layers"].get(name, {}).get("lr") or np.nan for r in history], lw=0.7, alpha=0.7)
    ax.plot(ep, [r["lr"] for r in history], color="black", lw=2, label="global lr")
    ax.set_xlabel("epoch", fontsize=10)
    ax.set_ylabel("learning rate", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.legend(fontsize=9, title=f"thin lines: {len(names)} tuned layers" if names else None, title_fontsize=9)
    return to_data_uri(fig, dpi=WIDE_DPI)
