"""``lr.png`` for ``curvscope lr-suggest``, drawn from the report's ``lr`` section.

So a saved report can be re-plotted: the rates per group on a log axis, and H-bar as a correlation heatmap
(layer interactions). Labels are plain Unicode (ηₛ, λₘₐₓ): no mathtext, no literal underscores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from curvscope.report.format import num
from curvscope.report.render import lean_log, model_label, pyplot, style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RATES = (  # report key, label, marker, colour
    ("lr_newton", "joint Newton", "o", "#1f4e79"),
    ("lr_diag", "diagonal", "s", "#d9822b"),
    ("lr_cubic", "cubic-regularized", "D", "#6a3d9a"),
    ("lr_stability", "stability bound 2/λₘₐₓ", "v", "#7f7f7f"),
    ("recommended", "recommended", "*", "#b22222"),
)
GREY = "#7f7f7f"


def _value(x: Any) -> float:
    return np.nan if x is None else float(x)


def lr_figure(section: dict[str, Any], problem: dict[str, Any] | None = None) -> Figure:
    """The rates per group and H-bar's correlation, drawn from the report.

    Left: every rate per group on a log axis, error bars = std over batches (a bar whose lower end would be
    ≤ 0 is drawn dotted down to the axis's edge); a rate that is ≤ 0 or not defined has no place on a log axis
    and is a hollow marker on the bottom edge, labelled ``≤0`` or ``n/a``. Right: ``H_bar_st / sqrt(|H_bar_ss
    H_bar_tt|)`` as a heatmap on [-1, 1].

    Args:
        section: the report's ``lr`` section.
        problem: the report's ``problem`` section (names the model in the title).
    """
    with style():
        return _draw(section, problem)


def _missing_label(section: dict[str, Any], key: str, s: int) -> str:
    """``≤0`` for a rate known to be non-positive (a negative joint Newton component), else ``n/a``."""
    eta = section.get("newton_eta")
    if key == "lr_newton" and eta is not None and eta[s] is not None and float(eta[s]) <= 0:
        return "≤0"
    return "n/a"


def _rates(ax, section: dict[str, Any], x: np.ndarray) -> None:
    """The rates panel: markers, error bars, edge markers and the legend above the axes."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    groups = section["groups"]
    shown = [r for r in RATES if any(r[0] in g for g in groups)]
    offsets = np.linspace(-0.2, 0.2, len(shown)) if len(shown) > 1 else np.zeros(1)
    series = []
    for (key, label, marker, colour), dx in zip(shown, offsets, strict=True):
        values = np.array([_value(g.get(key)) for g in groups])
        std = np.array([_value(g.get(f"{key}_std")) for g in groups])
        series.append((key, label, marker, colour, dx, values, np.where(np.isfinite(std), std, 0.0)))
    tops = [v + e for *_, v, e in series for v, e in zip(v, e, strict=True) if np.isfinite(v) and v > 0]
    lows = [v - e if v - e > 0 else v for *_, v, e in series for v, e in zip(v, e, strict=True)
            if np.isfinite(v) and v > 0]
    bound = section.get("lr_stability_global")
    if bound and bound > 0:
        tops.append(bound)
        lows.append(bound)
    lo, hi = (min(lows) / 4, max(tops) * 3) if lows else (0.1, 10.0)
    edge = blended_transform_factory(ax.transData, ax.transAxes)
    clipped = missing = False
    for key, label, marker, colour, dx, values, std in series:
        size = 10 if marker == "*" else 6
        pos = np.isfinite(values) & (values > 0)
        whole = pos & (values - std > 0)
        low = np.where(whole, std, 0.0)
        ax.errorbar(x[pos] + dx, values[pos], yerr=np.vstack([low[pos], std[pos]]), fmt=marker, color=colour,
                    label=label, markersize=size, capsize=3, linestyle="none")
        for xi, v in zip(x[pos & ~whole & (std > 0)] + dx, values[pos & ~whole & (std > 0)], strict=True):
            clipped = True
            ax.plot([xi, xi], [lo, v], color=colour, linestyle=":", linewidth=1.2)
            ax.plot([xi], [0.0], marker="v", color=colour, markersize=4, transform=edge, clip_on=False)
        for s in np.flatnonzero(~pos):
            missing = True
            ax.plot([x[s] + dx], [0.0], marker=marker, markersize=size, markerfacecolor="white",
                    markeredgecolor=colour, linestyle="none", transform=edge, clip_on=False, zorder=4)
            if len(groups) <= 8:
                ax.text(x[s] + dx, 0.03, _missing_label(section, key, s), transform=edge, ha="center",
                        va="bottom", fontsize=6, color=colour)
    ax.set_ylim(lo, hi)
    lean_log(ax, x=False)
    if bound:
        ax.axhline(bound, color=GREY, linestyle="--", linewidth=1, label=f"whole-model bound 2/λₘₐₓ(G) = {num(bound)}")
    handles, labels = ax.get_legend_handles_labels()
    if clipped:
        handles.append(Line2D([], [], color=GREY, linestyle=":", marker="v", markersize=4))
        labels.append("std ≥ rate: the bar's lower end is ≤ 0")
    if missing:
        handles.append(Line2D([], [], color=GREY, marker="o", markerfacecolor="white", linestyle="none"))
        labels.append("on the bottom edge: rate ≤0 or n/a")
    ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=2, borderaxespad=0,
              fontsize=7)


def _draw(section: dict[str, Any], problem: dict[str, Any] | None) -> Figure:
    plt = pyplot()
    groups = section["groups"]
    names = [g["name"] for g in groups]
    S = len(names)
    if S <= 8:  # side by side
        fig, (ax, hm) = plt.subplots(1, 2, figsize=(11.0, 5.4), gridspec_kw={"width_ratios": [1.4, 1.0]})
    else:  # many groups: the rates above, the heatmap below it, both as wide as the page (no empty gap)
        width = min(13.0, 5.0 + 0.3 * S)
        fig, (ax, hm) = plt.subplots(2, 1, figsize=(width, 5.0 + min(width, 0.28 * S + 2.0)),
                                     gridspec_kw={"height_ratios": [1.0, min(2.2, 0.06 * S + 0.6)]})
    x = np.arange(S)
    _rates(ax, section, x)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if S > 4 else 0, ha="right" if S > 4 else "center")
    ax.set_xlim(-0.6, S - 0.4)
    ax.set_xlabel(f"parameter group ({section['partition']})")
    ax.set_ylabel("learning rate ηₛ (log scale)")
    ax.grid(True, which="major", alpha=0.25)
    where = model_label(problem)
    fig.suptitle(f"Per-group learning rates: {where + ', ' if where else ''}{section['curvature']}, direction "
                 f"{section['direction']}", x=0.01, ha="left", fontsize=10)

    corr = np.array([[_value(v) for v in row] for row in section["h_bar_correlation"]], dtype=np.float64)
    hm.grid(False)  # the house style draws grids; not across a heatmap
    image = hm.imshow(np.ma.masked_invalid(corr), cmap="coolwarm", vmin=-1, vmax=1)
    hm.set_xticks(x)
    hm.set_yticks(x)
    hm.set_xticklabels(names, rotation=90, fontsize=7 if S > 8 else 8)
    hm.set_yticklabels(names, fontsize=7 if S > 8 else 8)
    hm.set_aspect("equal" if S <= 8 else "auto")
    if S <= 10:
        for i in range(S):
            for j in range(S):
                if np.isfinite(corr[i, j]):
                    hm.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=hm, fraction=0.046, pad=0.04, label="H̄ₛₜ / √|H̄ₛₛ H̄ₜₜ|")
    pd = "positive definite" if section["h_bar_positive_definite"] else "NOT positive definite"
    hm.set_title(f"H̄ as a correlation ({pd})", fontsize=10)
    hm.set_xlabel("group t")
    hm.set_ylabel("group s")
    fig.tight_layout()
    return fig
