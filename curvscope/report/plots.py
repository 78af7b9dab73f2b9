"""Figures for the spectrum report, drawn from the report's own fields (so a saved ``report.json`` can be
re-plotted): ``spectrum.png``, ``directions.png`` (ViViT Fig. 2) and ``layers.png``.

Each ``*_figure`` function takes report dicts (plain lists and floats, ``None`` for non-finite values) and
returns a matplotlib ``Figure``; :func:`render_png` turns it into PNG bytes without touching the disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from curvscope.report.format import num  # noqa: E402
from curvscope.report.render import STYLE as _STYLE  # noqa: E402
from curvscope.report.render import (
    facts_box,  # noqa: E402
    lean_log,  # noqa: E402
    render_png,  # noqa: E402
    subtitle,  # noqa: E402
)

__all__ = ["render_png"]


def num_na(x: float | None) -> str:
    """A label number, ``n/a`` when missing."""
    return num(x, missing="n/a")


BLUE, ORANGE, GREY, RED = "#1f4e79", "#d9822b", "#7f7f7f", "#b22222"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _floats(values: Sequence[Any] | None) -> np.ndarray:
    """A report list as float64, ``None`` (non-finite in the JSON) as NaN."""
    if values is None:
        return np.zeros(0)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _log_bins(values: np.ndarray, per_decade: int = 8, min_bins: int = 10) -> np.ndarray:
    lo, hi = np.log10(values.min()), np.log10(values.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(min_bins, int(math.ceil((hi - lo) * per_decade)))
    pad = (hi - lo) * 0.02
    return np.logspace(lo - pad, hi + pad, n + 1)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=GREY)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


_subtitle = subtitle


def remainder_label(top_k: int, rank: int | None) -> list[str]:
    """What ``flat_overlap`` (1 − Σₖ γₖ²/‖g‖²) is the share of: the null space of the GGN when the top-k
    directions are all of its nonzero ones, else the rest of the spectrum that was not computed as well."""
    if rank is not None and top_k < rank:
        return [f"beyond the top-{top_k} (1 − sum)", f"  (the other {rank - top_k:,} nonzero directions",
                "  and the null space)"]
    return ["null space (1 − sum)"]


# -- spectrum.png -------------------------------------------------------------------------------------------

def spectrum_figure(group: dict[str, Any], problem: dict[str, Any] | None = None,
                    approximation: dict[str, Any] | None = None) -> Figure:
    """Histogram of the nonzero eigenvalues on a log axis, with the cumulative share of the trace carried by
    the eigenvalues up to lambda on a twin axis; lambda_max, rank, trace and effective rank annotated."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.9))
        ev = _floats(group.get("eigenvalues"))
        ev = ev[np.isfinite(ev) & (ev > 0)]
        title = f"GGN eigenvalue spectrum: {group.get('name', 'all')}"
        sub = _subtitle(problem, approximation)
        ax.set_title(title + (f"\n{sub}" if sub else ""), loc="left")
        if ev.size == 0:
            _empty(ax, "no nonzero eigenvalues (the GGN is zero on this batch)")
            return fig
        bins = _log_bins(ev)
        ax.hist(ev, bins=bins, color=BLUE, alpha=0.85, edgecolor="white", linewidth=0.4, label="eigenvalues")
        floor = group.get("eigenvalue_floor")
        if floor is not None and floor > bins[0]:
            ax.axvspan(bins[0], floor, color=GREY, alpha=0.18, linewidth=0,
                       label=f"below the {(problem or {}).get('dtype', 'float32')} precision floor")
        lean_log(ax, y=False)
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("number of eigenvalues (log scale)")
        ax.set_axisbelow(True)
        lean_log(ax, x=False)  # a lone outlier eigenvalue is as visible as the bulk (a linear axis: a sliver)
        ax.set_ylim(0.7, ax.get_ylim()[1] * 6)  # room for the facts box above the bars

        trace = group.get("trace") or float(ev.sum())
        asc = np.sort(ev)
        share = np.cumsum(asc) / trace
        twin = ax.twinx()
        twin.step(np.concatenate([[bins[0]], asc]), np.concatenate([[0.0], share]), where="post", color=ORANGE,
                  linewidth=1.6, label="trace share of eigenvalues ≤ λ")
        twin.set_ylim(0, 1.02)
        twin.yaxis.set_major_formatter(PercentFormatter(1.0))
        twin.set_ylabel("cumulative share of tr G", color=ORANGE)
        twin.tick_params(axis="y", colors=ORANGE)
        twin.spines["right"].set_visible(True)
        twin.spines["right"].set_color(ORANGE)
        twin.spines["top"].set_visible(False)
        twin.grid(False)

        lam_max = float(ev.max())
        ax.axvline(lam_max, color=RED, linestyle="--", linewidth=1.0)
        ax.annotate(f"λₘₐₓ = {num_na(lam_max)}", xy=(lam_max, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-4, -4), textcoords="offset points", ha="right", va="top", color=RED, fontsize=8)
        facts = [f"rank = {group.get('rank', ev.size)}", f"trace = {num_na(trace)}"]
        if group.get("effective_rank") is not None:
            facts.append(f"effective rank = {num_na(group['effective_rank'])}")
        if group.get("num_params") is not None:
            facts.append(f"D = {group['num_params']:,}")
        facts_box(ax, facts)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        fig.tight_layout()
        return fig


# -- directions.png -----------------------------------------------------------------------------------------

def _scatter_loglog(ax, x: np.ndarray, y: np.ndarray, ylabel: str, title: str, snr_line: bool = False) -> None:
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    ax.set_title(title, loc="left")
    ax.set_xlabel("eigenvalue λₖ")
    ax.set_ylabel(ylabel)
    if not ok.any():
        _empty(ax, "not defined (one sample, or no directions)")
        return
    ax.scatter(x[ok], y[ok], s=9, color=BLUE, alpha=0.65, linewidths=0)
    lean_log(ax)
    if snr_line:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.3), max(hi, 3.0))
        ax.axhline(1.0, color=RED, linestyle="--", linewidth=1.0)
        ax.annotate("SNR = 1", xy=(1.0, 1.0), xycoords=("axes fraction", "data"), xytext=(-2, 3),
                    textcoords="offset points", ha="right", va="bottom", color=RED, fontsize=8)
        above = int((y[ok] > 1).sum())
        ax.set_title(f"{title}: SNR > 1 for {above} of {x.size}", loc="left")  # above the axes, never on points
    hidden = x.size - int(ok.sum())
    if hidden:
        ax.text(0.02, 0.03, f"{hidden} not shown (undefined or not positive)", transform=ax.transAxes,
                fontsize=7, color=GREY)


def directions_figure(group: dict[str, Any], problem: dict[str, Any] | None = None,
                      approximation: dict[str, Any] | None = None) -> Figure:
    """The four panels of ViViT Fig. 2 for one group: (a) |gamma_k| vs lambda_k, (b) gradient overlap
    gamma_k^2/||g||^2 summed per curvature bin, (c) SNR(lambda_k) and (d) SNR(gamma_k) vs lambda_k."""
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(8.6, 6.6))
        d = group.get("directions") or {}
        lam = _floats(d.get("lambda"))
        sub = _subtitle(problem, approximation)
        fig.suptitle(f"Gradient, curvature and noise along the top-{d.get('top_k', 0)} GGN eigenvectors: "
                     f"{group.get('name', 'all')}" + (f"\n{sub}" if sub else ""), x=0.01, ha="left",
                     fontsize=10)
        (a, b), (c, e) = axes
        _scatter_loglog(a, lam, _floats(d.get("gamma_abs")), "|γₖ| (directional gradient)",
                        "(a) directional gradient")

        b.set_title("(b) gradient overlap by curvature", loc="left")
        b.set_xlabel("eigenvalue λₖ (bins)")
        b.set_ylabel("Σ γₖ² / ‖g‖² over the bin")
        overlap = _floats(d.get("gradient_overlap"))
        ok = np.isfinite(lam) & (lam > 0) & np.isfinite(overlap)
        sums = edges = None
        if ok.any():
            bins = _log_bins(lam[ok], per_decade=4, min_bins=8)
            sums, edges = np.histogram(lam[ok], bins=bins, weights=overlap[ok])
        if sums is not None and (sums > 0).any():  # a zero gradient has no overlap to draw on a log axis
            pos = sums > 0
            b.bar(edges[:-1][pos], sums[pos], width=np.diff(edges)[pos], align="edge", color=BLUE, alpha=0.85,
                  edgecolor="white", linewidth=0.4)
            lean_log(b)
            if pos.any():
                b.set_ylim(max(sums[pos].min() / 3, 1e-12), 1.5)
            flat = d.get("flat_overlap")
            flat = None if flat is None else max(float(flat), 0.0)  # -4e-16 is rounding of 1 - sum: show 0
            rest = remainder_label(int(d.get("top_k") or ok.sum()), group.get("rank"))
            rest[0] += f": {_percent(flat)}"
            facts_box(b, [f"top-{int(ok.sum())} directions: {float(overlap[ok].sum()):.2%}", *rest])
        else:
            _empty(b, "no gradient overlap (zero gradient or no directions)")

        _scatter_loglog(c, lam, _floats(d.get("lambda_snr")), "SNR(λₖ)",
                        "(c) curvature signal-to-noise", snr_line=True)
        _scatter_loglog(e, lam, _floats(d.get("gamma_snr")), "SNR(γₖ)",
                        "(d) gradient signal-to-noise", snr_line=True)
        fig.tight_layout()
        return fig


# -- layers.png ---------------------------------------------------------------------------------------------

def layers_figure(groups: list[dict[str, Any]], problem: dict[str, Any] | None = None,
                  approximation: dict[str, Any] | None = None) -> Figure:
    """Per-block lambda_max and trace (horizontal bars, log scale), blocks in model order, top to bottom."""
    with plt.rc_context(_STYLE):
        names = [f"{g.get('name')} ({g.get('num_params', 0):,})" for g in groups]
        height = max(2.6, 0.32 * len(groups) + 1.4)
        fig, (left, right) = plt.subplots(1, 2, figsize=(8.6, height), sharey=True)
        sub = _subtitle(problem, approximation)
        fig.suptitle("Block-diagonal GGN: curvature per block" + (f"\n{sub}" if sub else ""), x=0.01,
                     ha="left", fontsize=10)
        y = np.arange(len(groups))
        for ax, key, label, color in ((left, "lambda_max", "λₘₐₓ of the block", BLUE),
                                      (right, "trace", "trace of the block", ORANGE)):
            vals = np.array([g.get(key) or 0.0 for g in groups], dtype=np.float64)
            pos = vals > 0
            if not pos.any():
                _empty(ax, f"all {key} are zero")
                continue
            floor = vals[pos].min() / 3
            ax.barh(y[pos], vals[pos] - floor, left=floor, color=color, alpha=0.85, height=0.7)
            lean_log(ax, y=False)
            ax.set_xlim(floor, vals.max() * 4)
            ax.set_xlabel(label)
            for yi, v, g in zip(y, vals, groups, strict=True):
                below = key == "lambda_max" and v <= 0 and (g.get("trace") or 0) > 0  # rank 0, nonzero trace
                text = " < precision floor (rank 0)" if below else f" {num_na(float(v))}"
                ax.text(max(v, floor), yi, text, va="center", ha="left", fontsize=7,
                        color=GREY if below else "black")
            ax.grid(axis="y", visible=False)
        left.set_yticks(y)
        left.set_yticklabels(names)
        left.invert_yaxis()
        left.set_ylabel("block (parameters)")
        fig.tight_layout()
        return fig


def spectrum_plots(report: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The figures a spectrum report has, as ``(files key, file name, make(report) -> Figure)``: spectrum.png
    always, directions.png when directional quantities exist, layers.png for block-diagonal groupings."""
    groups = report.get("groups") or []
    if not groups:
        return []
    jobs: list[tuple[str, str, Any]] = []
    if report.get("landscape"):
        from curvscope.report.matfree_report import landscape_figure

        jobs.append(("landscape_plot", "landscape.png",
                     lambda r: landscape_figure(r["landscape"], r.get("problem"), r.get("curvature"))))
    if report.get("method") == "lanczos":
        from curvscope.report.matfree_report import density_figure

        return [("spectrum_plot", "spectrum.png", lambda r: density_figure(r["groups"][0], r.get("problem"))),
                *jobs]
    jobs += [
        ("spectrum_plot", "spectrum.png",
         lambda r: spectrum_figure(r["groups"][0], r.get("problem"), r.get("approximation")))]
    if groups[0].get("directions"):
        jobs.append(("directions_plot", "directions.png",
                     lambda r: directions_figure(r["groups"][0], r.get("problem"), r.get("approximation"))))
    if report.get("grouping", "all") != "all" and len(groups) > 1:
        jobs.append(("layers_plot", "layers.png",
                     lambda r: layers_figure(r["groups"][1:], r.get("problem"), r.get("approximation"))))
    return jobs
