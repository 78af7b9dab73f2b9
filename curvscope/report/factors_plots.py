"""``factors.png``: heatmaps of the matrix factors (beside the ensemble ground truth) and a bar chart of the
ensemble correlations. Drawing only: the numbers come from the engine (the factor matrices) and the report's
``factors`` section (titles, parameters, correlations); :mod:`curvscope.report.render` turns it into PNG."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from curvscope.report.render import pyplot, style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_HEATMAPS = 6


MAX_CELLS = 128
"""A factor larger than this per side is drawn as block means (a 3072 x 3072 matrix at 1 pixel per entry is a
grey blur); the title says so."""


def block_means(matrix: np.ndarray, max_cells: int = MAX_CELLS) -> tuple[np.ndarray, int]:
    """``matrix`` averaged over ``k x k`` blocks so that no side exceeds ``max_cells`` (``k = 1``: unchanged)."""
    if matrix.ndim != 2 or max(matrix.shape) <= max_cells:
        return matrix, 1
    k = int(np.ceil(max(matrix.shape) / max_cells))
    rows, cols = (-(-matrix.shape[0] // k)) * k, (-(-matrix.shape[1] // k)) * k
    padded = np.full((rows, cols), np.nan)
    padded[:matrix.shape[0], :matrix.shape[1]] = matrix
    return np.nanmean(padded.reshape(rows // k, k, cols // k, k), axis=(1, 3)), k


def _signed_limit(*matrices: np.ndarray) -> float:
    """The colour scale's half-width: the largest finite |entry| of all ``matrices`` (1 when all are zero)."""
    peaks = [float(np.nanmax(np.abs(m))) for m in matrices if m.size and np.isfinite(m).any()]
    vmax = max(peaks, default=0.0)
    return vmax if vmax > 0 and np.isfinite(vmax) else 1.0


def colour_scale(vmax: float) -> tuple[float, str]:
    """The power of ten a colour bar's ticks are counted in, and its label suffix: ``(1e-4, " (×10⁻⁴)")`` for
    ``vmax = 3.2e-4``, so that every bar reads in one style (plain mantissas, the scale in its label, no offset
    text above the bar); ``(1.0, "")`` when ``vmax`` is between 1 and 10."""
    from curvscope.report.render import log_tick_labels

    exponent = int(np.floor(np.log10(vmax))) if vmax > 0 and np.isfinite(vmax) else 0
    if exponent == 0:
        return 1.0, ""
    return 10.0 ** exponent, f" (×{log_tick_labels([10.0 ** exponent])[0]})"


def _heatmap(ax, matrix: np.ndarray, title: str, vmax: float, k: int):
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="auto")
    ax.grid(False)
    ax.set_title(title + (f"\n(means of {k}x{k} blocks)" if k > 1 else ""), fontsize=9)
    ax.set_xlabel("column index" + (f" / {k}" if k > 1 else ""), fontsize=8)
    ax.set_ylabel("row index" + (f" / {k}" if k > 1 else ""), fontsize=8)
    ax.tick_params(labelsize=7)
    return image


def _colour_bar(fig: Figure, image, axes, name: str, shared: bool) -> None:
    """One labelled colour bar for ``axes`` (a factor beside its ground truth shares it)."""
    from matplotlib.ticker import FuncFormatter

    scale, suffix = colour_scale(image.norm.vmax)
    ticks = FuncFormatter(lambda v, _pos: f"{v / scale:g}".replace("-", "\u2212"))
    bar = fig.colorbar(image, ax=axes, fraction=0.046, pad=0.02, aspect=25, format=ticks)
    bar.set_label(f"{name} entry{suffix}" + (", both panels" if shared else ""), fontsize=8)
    bar.ax.tick_params(labelsize=7)


def factors_figure(factors: Mapping[str, np.ndarray], title: str,
                   ground_truth: Mapping[str, np.ndarray] | None = None,
                   correlation: Mapping[str, Mapping[str, float | None]] | None = None,
                   example_label: str = "this model", example_r: Mapping[str, float] | None = None,
                   params: Mapping[str, str] | None = None) -> Figure:
    """Heatmaps of the 2-D factors (at most :data:`MAX_HEATMAPS`), each beside its ground truth when given
    (``example_r``: the shown model's correlation per factor), and a bar chart of the correlation mean +- std
    per factor when ``correlation`` is given. ``params``: factor name -> the parameters it couples.

    At most two heatmaps a row (the figure stays under :data:`MAX_WIDTH` inches wide); each factor has one
    labelled colour scale, symmetric about 0, which its ground truth shares (the same colour is the same
    value in both panels)."""
    with style():
        return _factors_figure(factors, title, ground_truth, correlation, example_label, example_r, params)


MAX_WIDTH = 9.6
"""factors.png's width in inches (1248 pixels): two heatmaps with their colour bars."""


def _factors_figure(factors, title, ground_truth, correlation, example_label, example_r, params) -> Figure:
    names = [n for n, v in factors.items() if np.ndim(v) == 2]
    shown = names[:MAX_HEATMAPS]
    cols = 2 if ground_truth is not None or len(shown) > 1 else 1
    heat_rows = max(len(shown) if ground_truth is not None else -(-len(shown) // cols), 1)
    bar_rows = 1 if correlation else 0
    rows = heat_rows + bar_rows
    width = MAX_WIDTH if cols == 2 else MAX_WIDTH / 2 + 0.6
    fig = pyplot().figure(figsize=(width, 3.4 * rows + 0.4), constrained_layout=True)
    grid = fig.add_gridspec(rows, cols)
    if not shown:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no matrix-shaped factors (all factors are scalars or vectors)", ha="center",
                va="center")
    for i, name in enumerate(shown):
        mine, k = block_means(np.asarray(factors[name], dtype=np.float64))
        if ground_truth is not None:
            truth, _ = block_means(np.asarray(ground_truth[name], dtype=np.float64))
            vmax = _signed_limit(mine, truth)
            r0 = (example_r or {}).get(name)
            label = f"{name}: {example_label}" + (f" (r = {r0:.2f})" if r0 is not None and np.isfinite(r0) else "")
            left, right = fig.add_subplot(grid[i, 0]), fig.add_subplot(grid[i, 1])
            image = _heatmap(left, mine, label, vmax, k)
            _heatmap(right, truth, f"{name}: ensemble ground truth", vmax, k)
            _colour_bar(fig, image, [left, right], name, shared=True)
        else:
            about = f": {params[name]}" if params and name in params else ""
            ax = fig.add_subplot(grid[i // cols, i % cols])
            image = _heatmap(ax, mine, f"{name} {tuple(np.shape(factors[name]))}{about}", _signed_limit(mine), k)
            _colour_bar(fig, image, ax, name, shared=False)
    if correlation:
        ax = fig.add_subplot(grid[rows - 1, :])
        items = [(n, v) for n, v in correlation.items() if v.get("mean") is not None]
        if items:
            x = np.arange(len(items))
            means = [v["mean"] for _, v in items]
            stds = [v.get("std") or 0.0 for _, v in items]
            ax.bar(x, means, yerr=stds, color="tab:blue", capsize=3)
            ax.set_xticks(x)
            ax.set_xticklabels([n for n, _ in items], rotation=45 if len(items) > 6 else 0, ha="right"
                               if len(items) > 6 else "center", fontsize=8)
            ax.set_ylim(min(0.0, min(means) - 0.1), 1.05)
            ax.axhline(0, color="black", linewidth=0.6)
        else:
            ax.text(0.5, 0.5, "no factor with two or more entries", ha="center", va="center")
        ax.set_ylabel("Pearson r with ground truth")
        ax.set_xlabel("factor")
        ax.set_title("single-model estimate vs ensemble ground truth (mean ± std over models)", fontsize=9)
    more = f" ({len(shown)} of {len(names)} matrix factors shown)" if len(names) > len(shown) else ""
    fig.suptitle(_wrap(title + more, 110 if cols == 2 else 55), fontsize=10)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def factors_plot(section: Mapping[str, Any], factors: Mapping[str, np.ndarray],
                 ground_truth: Mapping[str, np.ndarray] | None = None,
                 example_r: Mapping[str, float] | None = None) -> Figure:
    """``factors.png`` for a report's ``factors`` section: ``factors`` are the matrices shown (ensemble model
    0's with an ensemble, beside ``ground_truth``; ``example_r``: its correlation per factor)."""
    title = (f"curvscope factors: {section['symmetry']} symmetry, source {section['source']}, "
             f"widths {'-'.join(str(w) for w in section['widths'])}")
    params = {b["name"]: " x ".join(b["params"]) for b in section["blocks"]}
    ensemble = section.get("ensemble")
    if ground_truth is None or not ensemble:
        return factors_figure(factors, title, params=params)
    return factors_figure(factors, title + f"; ensemble of {ensemble['models']} ({ensemble['init']})",
                          ground_truth=ground_truth, correlation=ensemble["correlation"],
                          example_label="ensemble model 0", example_r=example_r, params=params)


def factors_file_plot(section: Mapping[str, Any], tensors: Mapping[str, Any]) -> Figure:
    """``factors.png`` from a report's ``factors`` section and the tensors of its ``factors.safetensors``
    (CPU tensors or arrays by name): the factors, or with an ensemble ``example/<name>`` (model 0) beside
    ``ground_truth/<name>`` with its correlation ``correlation/<name>[0]``; in the section's block order (a
    safetensors file sorts its keys)."""
    names = [b["name"] for b in section["blocks"]]

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {n: np.asarray(tensors[prefix + n], dtype=np.float64) for n in names if prefix + n in tensors}

    own = group("")
    truth = group("ground_truth/")
    if not truth:
        return factors_plot(section, own)
    example_r = {n: float(r.reshape(-1)[0]) for n, r in group("correlation/").items() if r.size}
    return factors_plot(section, group("example/") or own, truth, example_r)
