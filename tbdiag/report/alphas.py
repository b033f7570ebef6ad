"""Alpha per layer, drawn to stay readable from a CNN's handful of layers to an LLM's hundreds.

Up to `LONG` layers each layer gets a named tick; beyond, the x axis counts blocks (``model.layers.3``) and
a block × matrix-type heat map (``self_attn.q_proj`` … by block) takes the place of unreadable ticks. Every
point, column and cell names its layer and values on hover (`tbdiag.report.hover`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from tbdiag.allocation.selection import block_of, in_block
from tbdiag.report.figures import BANDS, plain
from tbdiag.report.hover import Spot, fmt, heatmap, hover_html, thin_ticks, wide_figure

LONG = 60  # more layers than this: no name ticks, blocks on the axis and a block × matrix-type heat map


def _values(rows: Sequence[dict], key: str) -> np.ndarray:
    return np.array([math.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def layer_title(i: int, r: dict) -> str:
    """What the pointer shows of a layer: its place, name, alpha and the rest of its row."""
    shape = "×".join(str(d) for d in r.get("shape") or ())
    return (f"#{i + 1} {r['name']}\nalpha {fmt(r.get('alpha'))} ± {fmt(r.get('alpha_err'))} · {r.get('kind', '')} "
            f"{shape} · {r.get('n_evals', '-')} eigenvalues · {r.get('status', '')}")


def label_height(names: Sequence[str]) -> float:
    """Inches of rotated tick labels for these names (none for a long model: no name ticks)."""
    return 0.0 if len(names) > LONG else min(2.6, 0.075 * max((len(n) for n in names), default=0))


def _block_ticks(ax, names: Sequence[str]) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Ticks at the first layer of (some) blocks, labelled by the block's number; faint lines between blocks."""
    starts, labels, last = [], [], None
    for i, n in enumerate(names):
        block = block_of(n) if in_block(n) else None
        if block is not None and block != last:
            starts.append(i)
            labels.append(block.rsplit(".", 1)[-1])
        last = block
    if not starts:
        ax.set_xlabel(f"layer (model order, {len(names)} layers)", fontsize=10)
        return
    for i in starts:
        ax.axvline(i - 0.5, color="#000", alpha=0.08, lw=0.6)
    keep = thin_ticks(len(starts), 40)
    ax.set_xticks([starts[k] for k in keep], [plain(labels[k]) for k in keep], fontsize=9)
    ax.set_xlabel(f"block (model order, {len(names)} layers; hover a column for its layer)", fontsize=10)


def _name_axis(ax, names: Sequence[str]) -> None:  # noqa: ANN001 - a matplotlib Axes
    """The alpha axis label and the layer axis: every name up to `LONG` layers, block ticks beyond."""
    ax.set_ylabel("alpha", fontsize=10)
    ax.tick_params(labelsize=9)
    if len(names) <= LONG:
        ax.set_xticks(np.arange(len(names)), [plain(n) for n in names], rotation=90,
                      fontsize=9 if len(names) <= 30 else 8)
    else:
        _block_ticks(ax, names)


def draw_alpha(fig: Figure, rows: Sequence[dict], bands: bool) -> list[Spot]:
    """Alpha per layer in model order with ±alpha_err bars, over the HT-SR bands when ``bands`` (they are
    calibrated on the ks fit); returns one full-height hover column per layer."""
    names = [r["name"] for r in rows]
    a, e = _values(rows, "alpha"), _values(rows, "alpha_err")
    ax = fig.add_subplot()
    finite = np.isfinite(a)
    top = max(8.0, float(np.nanmax(a + np.nan_to_num(e))) * 1.05) if finite.any() else 8.0
    for lo, hi, color, label in BANDS if bands else ():
        ax.axhspan(lo, min(hi, top), color=color, alpha=0.6, label=label, lw=0)
    x = np.arange(len(names))
    ax.errorbar(x, a, yerr=np.nan_to_num(e), fmt="o", ms=4 if len(names) <= LONG else 2.5, color="#1f4e79",
                ecolor="#7f9fbf", capsize=2 if len(names) <= LONG else 0, lw=1)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(min(1.0, float(np.nanmin(a)) - 0.2) if finite.any() else 1.0, top)
    _name_axis(ax, names)
    if bands:
        ax.legend(loc="upper right", fontsize=9, ncols=3)
    return [Spot(ax, i - 0.5, i + 0.5, 0, 1, layer_title(i, r), full_height=True) for i, r in enumerate(rows)]


def alpha_by_layer(rows: Sequence[dict], bands: bool) -> str:
    """`draw_alpha` as hover HTML, as wide as the content column."""
    fig = wide_figure(3.6 + label_height([r["name"] for r in rows]))
    return hover_html(fig, draw_alpha(fig, rows, bands), "alpha per layer", "alpha-figure")


def block_layout(names: Sequence[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]] | None:
    """Blocks (columns), matrix types (rows) and each in-block layer's cell; None without a repeated block
    structure (fewer than 2 blocks)."""
    blocks, types, cell = [], [], {}
    for n in names:
        if not in_block(n):
            continue
        block = block_of(n)
        kind = n[len(block) + 1:]
        if block not in blocks:
            blocks.append(block)
        if kind not in types:
            types.append(kind)
        cell[n] = (types.index(kind), blocks.index(block))
    return (blocks, types, cell) if len(blocks) >= 2 else None


def block_heatmap(rows: Sequence[dict]) -> str | None:
    """For a long model: a matrix-type × block heat map of alpha, every cell named on hover; None when the
    model has no block structure or is short enough for `alpha_by_layer` alone."""
    layout = block_layout([r["name"] for r in rows]) if len(rows) > LONG else None
    if layout is None:
        return None
    blocks, types, cell = layout
    matrix = np.full((len(types), len(blocks)), math.nan)
    titles = [[""] * len(blocks) for _ in types]
    for i, r in enumerate(rows):
        if r["name"] in cell:
            t, b = cell[r["name"]]
            matrix[t, b] = math.nan if r.get("alpha") is None else r["alpha"]
            titles[t][b] = layer_title(i, r)
    prefixes = {b.rsplit(".", 1)[0] for b in blocks}
    cols = [b.rsplit(".", 1)[-1] for b in blocks] if len(prefixes) == 1 else blocks
    what = next(iter(prefixes)) if len(prefixes) == 1 else "block"
    return heatmap(matrix, types, cols, f"alpha by block ({what}.N) and matrix type", titles,
                   "alpha by block and matrix type", kind="block-heatmap")


def grouped_alphas(names: Sequence[str], series: Sequence[tuple[str, Sequence]], bands: bool = True) -> str:
    """Alpha per layer for several checkpoints side by side, over the HT-SR bands when ``bands``; each
    layer's column names the layer and every checkpoint's alpha on hover."""
    fig = wide_figure(3.6 + label_height(names))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    values = [np.array([math.nan if v is None else v for v in alphas], dtype=float) for _, alphas in series]
    for i, ((label, _), a) in enumerate(zip(series, values)):
        ax.plot(x + (i - (len(series) - 1) / 2) * 0.12, a, "o-", ms=3, lw=0.8, label=plain(label))
    finite = np.concatenate(values) if values else np.array([])
    finite = finite[np.isfinite(finite)]
    top = max(8.0, float(finite.max()) * 1.05) if len(finite) else 8.0
    for lo, hi, color, _ in BANDS if bands else ():
        ax.axhspan(lo, min(hi, top), color=color, alpha=0.35, lw=0)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(min(1.0, float(finite.min()) - 0.2) if len(finite) else 1.0, top)
    _name_axis(ax, names)
    ax.legend(fontsize=9)
    spots = [Spot(ax, i - 0.5, i + 0.5, 0, 1, f"#{i + 1} {n}\n" + "\n".join(
        f"{label}: alpha {fmt(float(a[i]))}" for (label, _), a in zip(series, values)), full_height=True)
        for i, n in enumerate(names)]
    return hover_html(fig, spots, "alpha per layer per checkpoint", "grouped-figure")


def spread_over_epochs(epochs: Sequence[int], stds: Sequence[float], means: Sequence[float], label: str) -> str:
    """alpha_std (and the mean alpha) of the tuned layers per epoch; each epoch's numbers on hover."""
    fig = wide_figure(3.0)
    ax = fig.add_subplot()
    ax.plot(epochs, stds, "o-", color="#1f4e79", ms=4, label="alpha spread (std, ddof 0)")
    twin = ax.twinx()
    twin.plot(epochs, means, "s--", color="#b45f06", ms=3, lw=1, label="mean alpha")
    ax.set_xlabel("epoch", fontsize=10)
    ax.set_ylabel("alpha std", fontsize=10, color="#1f4e79")
    twin.set_ylabel("mean alpha", fontsize=10, color="#b45f06")
    for a in (ax, twin):
        a.tick_params(labelsize=9)
    fig.legend(loc="outside upper right", fontsize=9, ncols=2)
    half = 0.5 if len(epochs) < 2 else (epochs[-1] - epochs[0]) / (len(epochs) - 1) / 2
    ax.set_xlim(epochs[0] - half, epochs[-1] + half)  # the hover columns tile the axes
    spots = [Spot(ax, e - half, e + half, 0, 1, f"{label}, epoch {e}\nalpha std {fmt(s)} · mean alpha {fmt(m)}",
                  full_height=True) for e, s, m in zip(epochs, stds, means)]
    return hover_html(fig, spots, f"alpha spread over epochs of {label}", "spread-figure")
