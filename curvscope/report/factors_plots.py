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


def _heatmap(fig: Figure, ax, matrix: np.ndarray, title: str) -> None:
    matrix, k = block_means(matrix)
    vmax = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="auto")
    ax.grid(False)
    ax.set_title(title + (f"\n(means of {k}x{k} blocks)" if k > 1 else ""), fontsize=9)
    ax.set_xlabel("column index" + (f" / {k}" if k > 1 else ""), fontsize=8)
    ax.set_ylabel("row index" + (f" / {k}" if k > 1 else ""), fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)


def factors_figure(factors: Mapping[str, np.ndarray], title: str,
                   ground_truth: Mapping[str, np.ndarray] | None = None,
                   correlation: Mapping[str, Mapping[str, float | None]] | None = None,
                   example_label: str = "this model", example_r: Mapping[str, float] | None = None,
                   params: Mapping[str, str] | None = None) -> Figure:
    """Heatmaps of the 2-D factors (at most :data:`MAX_HEATMAPS`), each beside its ground truth when given
    (``example_r``: the shown model's correlation per factor), and a bar chart of the correlation mean +- std
    per factor when ``correlation`` is given. ``params``: factor name -> the parameters it couples."""
    with style():
        return _factors_figure(factors, title, ground_truth, correlation, example_label, example_r, params)


def _factors_figure(factors, title, ground_truth, correlation, example_label, example_r, params) -> Figure:
    names = [n for n, v in factors.items() if np.ndim(v) == 2]
    shown = names[:MAX_HEATMAPS]
    if ground_truth is not None:
        cols, heat_rows = 2, max(len(shown), 1)
    else:
        cols = min(3, max(len(shown), 1))
        heat_rows = max(-(-len(shown) // cols), 1)
    bar_rows = 1 if correlation else 0
    rows = heat_rows + bar_rows
    fig = pyplot().figure(figsize=(4.6 * cols, 3.6 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, cols)
    if not shown:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no matrix-shaped factors (all factors are scalars or vectors)", ha="center",
                va="center")
    for i, name in enumerate(shown):
        if ground_truth is not None:
            r0 = (example_r or {}).get(name)
            label = f"{name}: {example_label}" + (f" (r = {r0:.2f})" if r0 is not None and np.isfinite(r0) else "")
            _heatmap(fig, fig.add_subplot(grid[i, 0]), np.asarray(factors[name]), label)
            _heatmap(fig, fig.add_subplot(grid[i, 1]), np.asarray(ground_truth[name]),
                     f"{name}: ensemble ground truth")
        else:
            about = f": {params[name]}" if params and name in params else ""
            _heatmap(fig, fig.add_subplot(grid[i // cols, i % cols]), np.asarray(factors[name]),
                     f"{name} {tuple(np.shape(factors[name]))}{about}")
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
        ax.set_title("single-model estimate vs ensemble ground truth (mean +- std over models)", fontsize=9)
    more = f" ({len(shown)} of {len(names)} matrix factors shown)" if len(names) > len(shown) else ""
    fig.suptitle(title + more, fontsize=10)
    return fig



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
