"""The one plot renderer: the house style, and a matplotlib Figure turned into PNG bytes without the disk.

matplotlib is imported here and only when a figure is drawn (``import curvscope`` stays light).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 130
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}
"""rcParams of every curvscope figure (apply with :func:`style` while building the figure)."""


def facts_box(ax, lines: list[str]) -> None:
    """The house facts box: ``lines`` in a rounded white box in the top-left corner of ``ax``."""
    ax.text(0.02, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"boxstyle": "round,pad=0.35", "facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.9})


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no window, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style():
    """A context manager applying :data:`STYLE` (use it around figure construction)."""
    return pyplot().rc_context(STYLE)


def render_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        with plt.rc_context(STYLE):
            # figures lay themselves out (tight_layout); bbox_inches="tight" would draw every figure twice
            fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()
