"""``lr.png`` for ``curvscope lr-suggest``, drawn from the report's ``lr`` section.

So a saved report can be re-plotted: the rates per group on a log axis, and H-bar as a correlation heatmap
(layer interactions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from curvscope.report.render import pyplot, style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RATES = (  # report key, label, marker, colour
    ("lr_newton", "joint Newton", "o", "#1f4e79"),
    ("lr_diag", "diagonal", "s", "#d9822b"),
    ("lr_cubic", "cubic-regularized", "D", "#6a3d9a"),
    ("lr_stability", "stability bound 2/λmax", "v", "#7f7f7f"),
    ("recommended", "recommended", "*", "#b22222"),
)


def _value(x: Any) -> float:
    return np.nan if x is None else float(x)


def lr_figure(section: dict[str, Any], problem: dict[str, Any] | None = None) -> Figure:
    """The rates per group and H-bar's correlation, drawn from the report.

    Left: every rate per group on a log axis (missing rates left out; error bars = std over batches).
    Right: ``H_bar_st / sqrt(|H_bar_ss H_bar_tt|)`` as a heatmap on [-1, 1].

    Args:
        section: the report's ``lr`` section.
        problem: the report's ``problem`` section (names the model in the title).
    """
    with style():
        return _draw(section, problem)


def _draw(section: dict[str, Any], problem: dict[str, Any] | None) -> Figure:
    plt = pyplot()
    groups = section["groups"]
    names = [g["name"] for g in groups]
    S = len(names)
    width = min(16.0, 6.0 + 0.45 * S)
    heat = 4.5 if S <= 6 else min(9.0, 2.5 + 0.4 * S)
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(width + heat, max(4.8, 0.3 * heat + 3)),
                                 gridspec_kw={"width_ratios": [width, heat]})
    x = np.arange(S)
    offsets = np.linspace(-0.28, 0.28, len(RATES))
    for (key, label, marker, colour), dx in zip(RATES, offsets, strict=True):
        values = np.array([_value(g.get(key)) for g in groups])
        if not np.isfinite(values).any():
            continue
        std = np.array([_value(g.get(f"{key}_std")) for g in groups])
        keep = np.isfinite(values) & (values > 0)
        yerr = None
        if np.isfinite(std).any():
            low = np.minimum(np.nan_to_num(std), values * 0.999)  # a log axis cannot go below 0
            yerr = np.vstack([low, np.nan_to_num(std)])[:, keep]
        ax.errorbar(x[keep] + dx, values[keep], yerr=yerr, fmt=marker, color=colour, label=label,
                    markersize=10 if marker == "*" else 6, capsize=3, linestyle="none")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if S > 4 else 0, ha="right" if S > 4 else "center")
    ax.set_xlabel(f"parameter group ({section['partition']})")
    ax.set_ylabel("learning rate η_s (log scale)")
    global_bound = section.get("lr_stability_global")
    if global_bound:
        ax.axhline(global_bound, color="#7f7f7f", linestyle="--", linewidth=1,
                   label="whole-model bound 2/λmax(G)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    where = f"{problem.get('checkpoint') or problem.get('model')}, " if problem else ""
    ax.set_title(f"Per-group learning rates ({where}{section['curvature']}, direction {section['direction']})",
                 fontsize=10)

    corr = np.array([[_value(v) for v in row] for row in section["h_bar_correlation"]], dtype=np.float64)
    hm.grid(False)  # the house style draws grids; not across a heatmap
    image = hm.imshow(np.ma.masked_invalid(corr), cmap="coolwarm", vmin=-1, vmax=1)
    hm.set_xticks(x)
    hm.set_yticks(x)
    hm.set_xticklabels(names, rotation=90, fontsize=7 if S > 8 else 8)
    hm.set_yticklabels(names, fontsize=7 if S > 8 else 8)
    if S <= 10:
        for i in range(S):
            for j in range(S):
                if np.isfinite(corr[i, j]):
                    hm.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=hm, fraction=0.046, pad=0.04, label="H̄_st / √|H̄_ss H̄_tt|")
    pd = "positive definite" if section["h_bar_positive_definite"] else "NOT positive definite"
    hm.set_title(f"H̄ as a correlation ({pd})", fontsize=10)
    hm.set_xlabel("group t")
    hm.set_ylabel("group s")
    fig.tight_layout()
    return fig
