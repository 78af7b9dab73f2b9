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
    if S <= 8:  # side by side
        fig, (ax, hm) = plt.subplots(1, 2, figsize=(11.0, 4.8), gridspec_kw={"width_ratios": [1.4, 1.0]})
    else:  # many groups: the rates above, the heatmap below it, both as wide as the page (no empty gap)
        width = min(13.0, 5.0 + 0.3 * S)
        fig, (ax, hm) = plt.subplots(2, 1, figsize=(width, 4.2 + min(width, 0.28 * S + 2.0)),
                                     gridspec_kw={"height_ratios": [1.0, min(2.2, 0.06 * S + 0.6)]})
    x = np.arange(S)
    shown = [r for r in RATES if np.isfinite(np.array([_value(g.get(r[0])) for g in groups])).any()]
    offsets = np.linspace(-0.18, 0.18, len(shown)) if len(shown) > 1 else np.zeros(1)
    for (key, label, marker, colour), dx in zip(shown, offsets, strict=True):
        values = np.array([_value(g.get(key)) for g in groups])
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
    source = (problem.get("checkpoint") or problem.get("model") or "") if problem else ""
    where = f"{str(source).replace(chr(92), '/').rsplit('/', 1)[-1]}: " if source else ""
    ax.set_title(f"Per-group learning rates\n{where}{section['curvature']}, direction {section['direction']}",
                 fontsize=10, loc="left")

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
    fig.colorbar(image, ax=hm, fraction=0.046, pad=0.04, label="H̄_st / √|H̄_ss H̄_tt|")
    pd = "positive definite" if section["h_bar_positive_definite"] else "NOT positive definite"
    hm.set_title(f"H̄ as a correlation ({pd})", fontsize=10)
    hm.set_xlabel("group t")
    hm.set_ylabel("group s")
    fig.tight_layout()
    return fig
