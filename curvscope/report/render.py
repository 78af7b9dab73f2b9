"""The one plot renderer: the house style, and a matplotlib Figure turned into PNG bytes without the disk.

matplotlib is imported here and only when a figure is drawn (``import curvscope`` stays light).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

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
    "text.parse_math": False,  # names, paths and labels are drawn literally: a '$' in a layer name is no mathtext
}
"""rcParams of every curvscope figure (apply with :func:`style` while building the figure)."""


def facts_box(ax, lines: list[str]) -> None:
    """The house facts box: ``lines`` in a rounded white box in the top-left corner of ``ax``."""
    ax.text(0.02, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"boxstyle": "round,pad=0.35", "facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.9})


def model_label(problem: dict[str, Any] | None) -> str:
    """The checkpoint's (else the model's) file name from a report's ``problem`` section, ``""`` when none."""
    source = (problem or {}).get("checkpoint") or (problem or {}).get("model")
    return str(source).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] if source else ""


def subtitle(problem: dict[str, Any] | None, approximation: dict[str, Any] | None = None) -> str:
    """The line under a figure's title that says what was measured: ``model | N=.., D=.., loss=..`` and the
    approximations (Monte-Carlo columns, a sub-sample) when not exact; ``""`` without a ``problem``."""
    if not problem:
        return ""
    parts = [label] if (label := model_label(problem)) else []
    facts = []
    if problem.get("batch_size") is not None:
        facts.append(f"N={problem['batch_size']}")
    if isinstance(problem.get("num_params"), int):
        facts.append(f"D={problem['num_params']:,}")
    if problem.get("loss"):
        facts.append(f"loss={problem['loss']}")
    if facts:
        parts.append(", ".join(facts))
    if approximation and not approximation.get("exact", True):
        bits = []
        if approximation.get("mc_samples"):
            bits.append(f"MC={approximation['mc_samples']}")
        if approximation.get("subsample"):
            bits.append(f"subsample={approximation['subsample']}")
        if bits:
            parts.append(", ".join(bits))
    return " | ".join(parts)


def legend_below(fig, handles, labels, facts: list[str] | None = None, ncol: int = 3) -> None:
    """The legend (and a facts block, right-aligned) in a strip under the axes, so that neither covers a line
    or a point; lay the figure out with ``fig.tight_layout(rect=(0, bottom, 1, 1))``, ``bottom`` from
    :func:`strip_height`."""
    if handles:
        fig.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.01, 0.01), ncol=max(1, min(ncol, len(labels))),
                   borderaxespad=0.2)
    if facts:
        fig.text(0.99, 0.015, "\n".join(facts), ha="right", va="bottom", fontsize=8)


def strip_height(fig, lines: int) -> float:
    """The figure fraction a :func:`legend_below` strip of ``lines`` text lines takes (8 pt, with padding)."""
    return min(0.45, (0.16 * lines + 0.12) / fig.get_figheight())


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_of_ten(value: float) -> int | None:
    import math

    if value <= 0 or not math.isfinite(value):
        return None
    exponent = round(math.log10(value))
    return exponent if abs(value / 10.0**exponent - 1) < 1e-9 else None


def log_tick_labels(values) -> list[str]:
    """A log axis's tick labels in plain Unicode: ``10⁻³``, ``10⁻²``, ... when every tick is a power of ten,
    else short plain numbers for all (``0.05``, ``0.1``, ``0.2``), never the two styles mixed.

    matplotlib's default log labels are mathtext (``$10^{-3}$``), whose parser was most of the time a figure
    took to draw."""
    exponents = [_power_of_ten(float(v)) for v in values]
    if all(e is not None for e in exponents):
        return ["1" if e == 0 else "10" if e == 1 else "10" + str(e).translate(_SUPERSCRIPT) for e in exponents]
    return [f"{float(v):g}" if float(v) > 0 else "" for v in values]


def _log_formatter():
    from matplotlib.ticker import Formatter

    class LeanLogFormatter(Formatter):
        def format_ticks(self, values):
            return log_tick_labels(values)

        def __call__(self, x, pos=None):  # a lone value (the cursor readout): its own style
            return log_tick_labels([x])[0]

    return LeanLogFormatter()


def _log_locator():
    """Major ticks at powers of ten, or at 1-2-5 (1..9) times them when the axis spans under 1.5 (0.6)
    decades, so that a narrow log axis still has labels (there are no minor ticks to label)."""
    import math

    from matplotlib.ticker import LogLocator

    class LeanLogLocator(LogLocator):
        def tick_values(self, vmin, vmax):
            lo, hi = min(vmin, vmax), max(vmin, vmax)
            span = math.log10(hi / lo) if lo > 0 and math.isfinite(hi / lo) else math.inf
            self.set_params(subs=(1.0,) if span >= 1.5 else (1.0, 2.0, 5.0) if span >= 0.6
                            else tuple(float(i) for i in range(1, 10)))
            return super().tick_values(vmin, vmax)

    return LeanLogLocator()


def lean_log(ax, x: bool = True, y: bool = True) -> None:
    """Put ``ax``'s x and/or y axis on a log scale that draws fast: no minor ticks, plain-Unicode major labels
    (:func:`log_tick_labels`), more of them on a narrow axis. Call it instead of ``set_xscale("log")`` (which
    would reset them)."""
    from matplotlib.ticker import NullLocator

    for on, axis, set_scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if on:
            set_scale("log")
            axis.set_major_locator(_log_locator())
            axis.set_minor_locator(NullLocator())
            axis.set_major_formatter(_log_formatter())


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
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    plt = pyplot()
    buf = io.BytesIO()
    if isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine):
        # what fig.tight_layout() leaves behind: savefig would lay the figure out by drawing it once more, for
        # nothing (the layout is done), which doubled the time a figure took
        fig.set_layout_engine(None)
    try:
        with plt.rc_context(STYLE):
            # figures lay themselves out (tight_layout); bbox_inches="tight" would draw every figure twice
            fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()
