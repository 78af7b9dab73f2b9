"""``track.png``: sharpness against step with the optimizer's threshold, loss and gradient norm, and the block
sharpness of each group as a heatmap over steps, drawn from the report's ``track`` section alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from curvscope.report.format import num as fmt
from curvscope.report.render import facts_box, lean_log, pyplot, style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SHARP, COMPARED, EDGE, LOSS, GRAD = "#1f4e79", "#6a3d9a", "#b22222", "#2e7d32", "#d9822b"


def _series(points: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if p.get(key) is None else float(p[key]) for p in points], dtype=float)


def track_figure(section: dict[str, Any], problem: dict[str, Any] | None = None) -> Figure:
    """The figure of a ``track`` section (and the report's ``problem`` section, for the title)."""
    with style():
        return _draw(section, problem or {})


def _threshold_label(points: list[dict[str, Any]]) -> str:
    kinds = {p.get("optimizer") for p in points}
    if kinds & {"adam", "adamw"}:
        return "threshold (2 + 2β₁)/((1 − β₁)η)  (38/η at β₁ = 0.9)"
    if any((p.get("momentum") or 0) > 0 for p in points):
        return "threshold (2 + 2β)/η  (heavy ball)"
    return "threshold 2/η"


def _draw(section: dict[str, Any], problem: dict[str, Any]) -> Figure:
    plt = pyplot()
    points = section.get("points") or []
    names = section.get("group_names") or []
    heat = bool(names) and any(p.get("groups") for p in points)
    rows = 3 if heat else 2
    heights = [2.2, 1.2] + ([min(2.4, 0.9 + 0.12 * len(names))] if heat else [])
    fig, axes = plt.subplots(rows, 1, figsize=(8.6, 2.0 + 1.9 * sum(heights) / 1.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    axes[0].sharex(axes[1])
    steps = np.array([float(p["step"]) for p in points])
    _sharpness_axis(axes[0], points, steps, section)
    _loss_axis(axes[1], points, steps)
    if heat:
        _heatmap(fig, axes[2], points, names)
    model = problem.get("model") or "model"
    curvature = "GGN" if section.get("curvature") == "ggn" else "Hessian"
    done = "" if section.get("complete", True) else f" (incomplete: {len(points)} of {section.get('checkpoints')})"
    fig.suptitle(f"Sharpness over training: {curvature} of {model} on a fixed batch of "
                 f"{problem.get('batch_size', '?')}{done}", fontsize=10)
    fig.tight_layout()
    return fig


def _sharpness_axis(ax, points: list[dict[str, Any]], steps: np.ndarray, section: dict[str, Any]) -> None:
    lam = _series(points, "lambda_max")
    pre = _series(points, "preconditioned_lambda_max")
    thr = _series(points, "threshold")
    adam = bool(np.isfinite(pre).any())
    symbol = "λ_max(G)" if section.get("curvature") == "ggn" else "λ_max(H)"
    if adam:
        ax.plot(steps, pre, "o-", color=COMPARED, ms=3.5, lw=1.6, label="preconditioned sharpness λ_max(P⁻¹H)")
        ax.plot(steps, lam, "o-", color=SHARP, ms=2.5, lw=1.0, alpha=0.6, label=f"sharpness {symbol}")
    else:
        compared = _series(points, "compared_sharpness")
        shown = compared if np.isfinite(compared).any() else lam
        label = f"sharpness {symbol}" + (" + weight decay" if np.nanmax(np.abs(shown - lam), initial=0) > 0 else "")
        ax.plot(steps, shown, "o-", color=SHARP, ms=3.5, lw=1.6, label=label)
    if np.isfinite(thr).any():
        ax.step(steps, thr, where="post", color=EDGE, lw=1.3, ls="--", label=_threshold_label(points))
        ratio = _series(points, "sharpness_ratio")
        over = np.isfinite(ratio) & (ratio >= 1)
        if over.any():
            values = pre if adam else _series(points, "compared_sharpness")
            ax.plot(steps[over], values[over], "o", color=EDGE, ms=6, mfc="none", mew=1.4,
                    label="at or above the threshold")
    ax.set_ylabel("sharpness")
    values = np.concatenate([pre, lam, thr])
    top = np.nanmax(values, initial=0.0)
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and np.all(lam[np.isfinite(lam)] > 0) and top / positive.min() > 20:
        lean_log(ax, x=False, y=True)  # a sharpness far below its threshold (Adam): both readable
        ax.set_ylim(bottom=positive.min() / 1.5, top=top * 30)  # room for the legend above the threshold
        legend = "upper right"
    else:
        legend = "best"
        if np.isfinite(top) and top > 0:
            ax.set_ylim(bottom=min(0.0, float(np.nanmin(lam, initial=0.0))), top=top * 1.25)
    ax.legend(loc=legend)
    summary = section.get("summary") or {}
    lines = [f"{len(points)} checkpoints, steps {fmt(int(steps[0]))}-{fmt(int(steps[-1]))}" if len(points) else ""]
    if summary.get("max_sharpness_ratio") is not None:
        lines.append(f"largest ratio {fmt(summary['max_sharpness_ratio'], 3)}")
    if summary.get("first_step_at_threshold") is not None:
        lines.append(f"reaches the threshold at step {fmt(summary['first_step_at_threshold'])}")
    facts_box(ax, [line for line in lines if line])


def _loss_axis(ax, points: list[dict[str, Any]], steps: np.ndarray) -> None:
    loss = _series(points, "loss")
    grad = _series(points, "gradient_norm")
    ax.plot(steps, loss, "s-", color=LOSS, ms=3, lw=1.3, label="loss")
    ax.set_ylabel("loss", color=LOSS)
    if np.isfinite(loss).any() and np.nanmin(loss) > 0:
        lean_log(ax, x=False, y=True)
    twin = ax.twinx()
    twin.plot(steps, grad, "^-", color=GRAD, ms=3, lw=1.1, label="gradient norm")
    twin.set_ylabel("‖gradient‖", color=GRAD)
    twin.grid(False)
    twin.spines["right"].set_visible(True)
    if np.isfinite(grad).any() and np.nanmin(grad) > 0:
        lean_log(twin, x=False, y=True)
    ax.set_xlabel("step")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right")


def _heatmap(fig, ax, points: list[dict[str, Any]], names: list[str]) -> None:
    values = np.array([[np.nan if (p.get("groups") or {}).get(n) is None else float(p["groups"][n])
                        for p in points] for n in names], dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    from matplotlib.colors import LogNorm, Normalize

    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.max() > positive.min() \
        else Normalize()
    image = ax.imshow(np.where(values > 0, values, np.nan), aspect="auto", interpolation="nearest", cmap="magma",
                      norm=norm)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n if len(n) <= 22 else "…" + n[-21:] for n in names], fontsize=7)
    ticks = np.unique(np.linspace(0, len(points) - 1, min(len(points), 16)).round().astype(int))
    ax.set_xticks(ticks)
    ax.set_xticklabels([fmt(points[i]["step"]) for i in ticks])
    ax.set_xlabel("step")
    ax.set_title("block sharpness of each layer (λ_max of its diagonal block)", fontsize=9, loc="left")
    ax.grid(False)
    fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
