"""Figures that name what is under the pointer: a PNG drawn by matplotlib, and over it an SVG of one
transparent ``<rect>`` per layer (or heat-map cell) holding a ``<title>`` — the browser's own tooltip. No
script and nothing external: the page stays one self-contained file, and the same HTML works in a notebook.

The figure is drawn once at its final size (no ``bbox_inches="tight"``, constrained layout instead), so
the data coordinates of each spot map to the PNG's pixels; the SVG has the PNG's pixel size as its viewBox
and is stretched over the image, so the spots stay on their points at any displayed width.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from tbdiag.report.figures import WIDE_DPI, WIDE_IN, plain

# Styles inline on the elements (a notebook shows the figure without the report's style sheet).
FIGURE_STYLE = "position:relative;margin:8px 0;width:100%;max-width:100%"
IMG_STYLE = "display:block;width:100%;height:auto"
SVG_STYLE = "position:absolute;left:0;top:0;width:100%;height:100%"
HOVER_CSS = ("svg.hover rect:hover { fill-opacity: .12; stroke: #222; stroke-width: 1; }")


@dataclass(frozen=True)
class Spot:
    """A hover area in the data coordinates of ``ax`` (``full_height``: the whole height of the axes)."""

    ax: object
    x0: float
    x1: float
    y0: float
    y1: float
    title: str
    full_height: bool = False


def wide_figure(height_in: float) -> Figure:
    """A figure as wide as the content column (1280 px), laid out by matplotlib's constrained layout."""
    return Figure(figsize=(WIDE_IN, height_in), dpi=WIDE_DPI, layout="constrained")


def hover_html(fig: Figure, spots: Sequence[Spot], alt: str, kind: str) -> str:
    """The figure as ``<figure>`` HTML: the PNG, and the SVG of the spots (every label escaped)."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # keep the drawn layout: the PNG must match the spots' pixels
    width, height = fig.bbox.width, fig.bbox.height
    rects = []
    for s in spots:
        transform = (blended_transform_factory(s.ax.transData, s.ax.transAxes) if s.full_height
                     else s.ax.transData)
        (ax0, ay0), (ax1, ay1) = transform.transform([(s.x0, 0 if s.full_height else s.y0),
                                                      (s.x1, 1 if s.full_height else s.y1)])
        x, y = min(ax0, ax1), height - max(ay0, ay1)
        w, h = abs(ax1 - ax0), abs(ay1 - ay0)
        rects.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="#000" '
                     f'fill-opacity="0"><title>{html.escape(s.title)}</title></rect>')
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure class="fig {kind}" style="{FIGURE_STYLE}"><img alt="{html.escape(alt)}" src="{src}" '
            f'width="{width:.0f}" height="{height:.0f}" style="{IMG_STYLE}">'
            f'<svg class="hover" viewBox="0 0 {width:.1f} {height:.1f}" preserveAspectRatio="none" '
            f'style="{SVG_STYLE}" xmlns="http://www.w3.org/2000/svg">{"".join(rects)}</svg></figure>')


def fmt(x: object, digits: int = 3) -> str:
    """A number for a label: ``-`` for a missing one."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def thin_ticks(n: int, most: int = 48) -> np.ndarray:
    """At most ``most`` evenly spaced tick positions among ``n``."""
    step = max(1, int(np.ceil(n / most)))
    return np.arange(0, n, step)


def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, titles: Sequence[Sequence[str]],
            alt: str, label: str = "alpha", kind: str = "heatmap") -> str:
    """A rows × columns heat map (nan blank); each cell with a title (``titles[i][j]``, "" for none) shows it
    on hover."""
    height = min(24.0, 1.6 + 0.2 * len(rows)) if len(rows) <= 80 else min(24.0, 2.0 + 0.06 * len(rows))
    fig = wide_figure(height)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label, pad=0.01)
    ticks = thin_ticks(len(cols))
    ax.set_xticks(ticks, [plain(cols[i]) for i in ticks], rotation=60 if len(cols) > 12 else 0, fontsize=9,
                  ha="right" if len(cols) > 12 else "center")
    if len(rows) <= 80:
        ax.set_yticks(np.arange(len(rows)), [plain(r) for r in rows], fontsize=8 if len(rows) > 30 else 9)
    else:
        ax.set_ylabel(f"layer (model order, {len(rows)})", fontsize=10)
    ax.set_title(plain(title), fontsize=11)
    spots = [Spot(ax, j - 0.5, j + 0.5, i - 0.5, i + 0.5, titles[i][j])
             for i in range(len(rows)) for j in range(len(cols)) if titles[i][j]]
    return hover_html(fig, spots, alt, kind)
