"""Report fields, terminal tables and figures of the matrix-free spectrum (Lanczos, Hutch++, SLQ; Hessian or
GGN) and of the loss landscape. Writers only: the numbers come from :mod:`curvscope.curvature.matfree.spectrum` and
:mod:`curvscope.curvature.landscape`. Field-by-field documentation: ``docs/report.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from curvscope.report.format import finite_or_none
from curvscope.report.format import num as fmt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from curvscope.curvature.landscape import Landscape
    from curvscope.curvature.matfree.spectrum import MatfreeGroup, MatfreeResult


def group_fields(group: MatfreeGroup, curvature: str) -> dict[str, Any]:
    """One entry of ``groups`` for a matrix-free group (the same keys as a Gram group where they apply)."""
    top = group.top.tolist()
    lam_max = group.lambda_max
    fields: dict[str, Any] = {
        "name": group.name,
        "parameters": list(group.param_names),
        "num_params": int(group.num_params),
        "curvature": curvature,
        "method": "lanczos",
        "eigenvalues": top,
        "eigenvalues_bottom": None if group.bottom is None else group.bottom.tolist(),
        "residuals": group.top_residuals.tolist(),
        "residuals_bottom": None if group.bottom_residuals is None else group.bottom_residuals.tolist(),
        "converged": bool(group.converged),
        "certain": int(group.certain),
        "tolerance": float(group.tol),
        "rank": None,
        "trace": finite_or_none(group.trace),
        "trace_stderr": finite_or_none(group.trace_stderr) if group.trace_method != "exact" else None,
        "trace_method": group.trace_method,
        "lambda_max": finite_or_none(lam_max),
        "lambda_min": finite_or_none(group.lambda_min) if group.bottom is not None else None,
        "negative_mass": finite_or_none(group.negative_mass),
        "effective_rank": None,
        "stability_lr": finite_or_none(group.stability_lr) if lam_max is not None and lam_max > 0 else None,
        "gradient_norm": None,
        "matvecs": int(group.matvecs),
        "solver": {"kind": getattr(group, "solver", "block"), "block_size": int(group.block_size),
                   "max_basis": int(group.max_basis)},
        "density": None if group.density is None else {
            "grid": group.density.grid.tolist(), "values": group.density.values.tolist(),
            "sigma": float(group.density.sigma)},
        "directions": None,
    }
    return fields


def matfree_fields(result: MatfreeResult, batch_size: int) -> dict[str, Any]:
    """The top-level report fields of a matrix-free ``spectrum`` run."""
    return {
        "loss_value": float(result.loss_value),
        "gradient_norm": None,
        "approximation": {"mc_samples": 0, "subsample": None, "curvature_samples": batch_size,
                          "num_columns": None, "exact": True, "method": "lanczos", "curvature": result.curvature,
                          "matvecs": int(result.matvecs), "seed": int(result.seed)},
        "grouping": result.grouping,
        "curvature": result.curvature,
        "method": "lanczos",
        "groups": [group_fields(g, result.curvature) for g in result.groups],
        "newton": None,
    }


def lanczos_section(result: MatfreeResult, batch_size: int, *, gradient_norm: float | None, path: str,
                    ggn: Any = None) -> dict[str, Any]:
    """The report's top-level fields of a matrix-free ``spectrum`` run (without ``notes`` and ``files``).

    Args:
        result: the :class:`~curvscope.curvature.matfree.MatfreeResult`.
        batch_size: N, the problem's batch size.
        gradient_norm: the norm of the batch gradient.
        path: how the products were computed.
        ggn: with the Hessian, the whole-model GGN computed beside it (``lambda_max``, ``trace`` and ``method``
            attributes, :class:`~curvscope.workflows.spectrum.GgnBeside`), for ``comparison``; else ``None``.

    Returns:
        :func:`matfree_fields` with ``gradient_norm``, then ``comparison``, ``landscape`` (``None``: filled in by
        the caller when computed), ``path`` and ``rules`` (``None``: no rows of V, every product is a double
        backward).
    """
    fields = matfree_fields(result, batch_size)
    fields["gradient_norm"] = gradient_norm
    fields["comparison"] = None
    fields["landscape"] = None
    fields["path"] = path
    fields["rules"] = None
    if ggn is not None:
        fields["comparison"] = comparison_fields(fields["groups"][0], ggn.lambda_max, ggn.trace, ggn.method)
    return fields


def comparison_fields(hessian: dict[str, Any], ggn_lambda_max: float | None, ggn_trace: float | None,
                      ggn_method: str = "gram") -> dict[str, Any]:
    """How much of the Hessian's curvature the GGN captures (whole model): both lambda_max and traces.

    ``hessian``: the whole model's group fields (:func:`group_fields`); the GGN's ``lambda_max`` and trace, and the
    method that computed them (``gram`` or ``lanczos``).
    """
    h_trace, g_trace = hessian.get("trace"), ggn_trace
    return {
        "hessian_lambda_max": hessian.get("lambda_max"),
        "hessian_lambda_min": hessian.get("lambda_min"),
        "hessian_trace": h_trace,
        "ggn_lambda_max": ggn_lambda_max,
        "ggn_trace": g_trace,
        "ggn_method": ggn_method,
        "trace_ratio": g_trace / h_trace if h_trace and g_trace is not None and h_trace > 0 else None,
        "negative_mass": hessian.get("negative_mass"),
    }


def landscape_fields(land: Landscape, eigenvalues: list[float]) -> dict[str, Any]:
    """The ``landscape`` section: losses along the top eigenvector and over the plane of the top two."""
    return {
        "directions": "top eigenvectors of groups[0]",
        "eigenvalues": eigenvalues[:2],
        "loss0": float(land.loss0),
        "slope": float(land.slope),
        "curvature": float(land.curvature),
        "radius": float(land.radius),
        "t": land.t.tolist(),
        "loss_1d": land.loss_1d.tolist(),
        "quadratic_1d": land.quadratic_1d.tolist(),
        "radius_2d": None if land.radius_2d is None else float(land.radius_2d),
        "grid_s": None if land.grid_s is None else land.grid_s.tolist(),
        "grid_t": None if land.grid_t is None else land.grid_t.tolist(),
        "loss_2d": None if land.loss_2d is None else land.loss_2d.tolist(),
    }


# -- terminal -----------------------------------------------------------------------------------------------

def matfree_table(report: dict[str, Any], labels: list[str] | None = None) -> Table:
    """One row per group: the extreme eigenvalues, trace ± standard error, negative mass, convergence.
    ``labels``: row labels (default: the group names)."""
    curvature = report.get("curvature", "hessian")
    hessian = curvature == "hessian"
    approx = report.get("approximation") or {}
    solver = ((report.get("groups") or [{}])[0].get("solver") or {})
    plan = ("two vectors" if solver.get("kind") == "lean" else
            f"basis {solver['max_basis']}" if solver.get("max_basis") else None)
    table = Table(title=f"{'Hessian' if hessian else 'GGN'} spectrum (Lanczos, {fmt(approx.get('matvecs'))} "
                        f"products{'' if plan is None else ', ' + plan})", title_justify="left")
    table.add_column("group", no_wrap=True)
    headers = ["params", "λ_max"] + (["λ_min", "neg.\nmass"] if hessian else []) + ["trace", "± s.e.", "conv."]
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    groups = report.get("groups", [])
    for g, label in zip(groups, labels or [str(g["name"]) for g in groups], strict=True):
        row = [escape(label), fmt(g.get("num_params")), fmt(g.get("lambda_max"))]
        if hessian:
            mass = g.get("negative_mass")
            row += [fmt(g.get("lambda_min")), "-" if mass is None else f"{mass:.1%}"]
        row += [fmt(g.get("trace")), fmt(g.get("trace_stderr")), "yes" if g.get("converged") else "[red]no[/red]"]
        table.add_row(*row)
    return table


def comparison_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Facts-table rows comparing the Hessian with the GGN."""
    c = report.get("comparison")
    if not c:
        return []
    ratio = c.get("trace_ratio")
    rows = [("GGN vs Hessian", f"λ_max {fmt(c.get('ggn_lambda_max'))} vs {fmt(c.get('hessian_lambda_max'))}, "
                               f"trace {fmt(c.get('ggn_trace'))} vs {fmt(c.get('hessian_trace'))}"
                               + ("" if ratio is None else f" ({ratio:.0%})"))]
    if c.get("hessian_lambda_min") is not None and c["hessian_lambda_min"] < 0:
        mass = c.get("negative_mass")
        rows.append(("negative curvature", f"λ_min {fmt(c['hessian_lambda_min'])}"
                     + ("" if mass is None else f", {mass:.1%} of the spectrum's weight clearly below 0")))
    return rows


# -- figures ------------------------------------------------------------------------------------------------


def psd_density(grid: Any, values: Any) -> tuple[Any, Any]:
    """The smoothed density of a positive semi-definite operator on ``λ ≥ 0``: the Gaussian kernels put part of
    the mass of the eigenvalues near 0 below 0, where a GGN has none; that part is mirrored back at 0 (the
    boundary correction of a kernel density on ``[0, ∞)``), so the curve still integrates to 1."""
    import numpy as np

    grid, values = np.asarray(grid, dtype=float), np.asarray(values, dtype=float)
    if grid.size == 0 or grid[-1] < 0:
        return grid[:0], values[:0]
    g = grid[grid >= 0]
    if grid[0] < 0 and (g.size == 0 or g[0] > 0):
        g = np.concatenate([[0.0], g])
    return g, np.interp(g, grid, values) + np.interp(-g, grid, values, left=0.0, right=0.0)


def density_figure(group: dict[str, Any], problem: dict[str, Any] | None = None) -> Figure:
    """The SLQ spectral density as PyHessian draws it: the density on a log axis over a linear eigenvalue axis,
    λₘₐₓ (and the Hessian's λₘᵢₙ) as dashed lines named in the legend, which sits with the facts (trace, weight
    below 0, D) in a strip under the axes. A GGN's density is drawn on λ ≥ 0 only (:func:`psd_density`)."""
    import numpy as np

    from curvscope.report.render import lean_log, legend_below, pyplot, strip_height, style, subtitle

    plt = pyplot()
    with style():
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        hessian = group.get("curvature") == "hessian"
        sub = subtitle(problem)
        ax.set_title(f"{'Hessian' if hessian else 'GGN'} spectral density (SLQ): {group.get('name', 'all')}"
                     + (f"\n{sub}" if sub else ""), loc="left")
        density = group.get("density") or {}
        grid = np.array(density.get("grid") or [], dtype=float)
        values = np.array([np.nan if v is None else v for v in density.get("values") or []], dtype=float)
        if not hessian:
            grid, values = psd_density(grid, values)
        ok = np.isfinite(values) & np.isfinite(grid)
        grid, values = grid[ok], values[ok]
        facts = []
        if grid.size and values.max() > 0:
            peak = float(values.max())
            floor = peak * 1e-8  # PyHessian adds 1e-7 to densities that peak near 10 to 100
            label = f"density (kernel σ = {fmt(density.get('sigma'))})"
            ax.plot(grid, np.maximum(values, floor), color="#1f4e79", linewidth=1.3, label=label)
            ax.fill_between(grid, floor, np.maximum(values, floor), color="#1f4e79", alpha=0.15, linewidth=0)
            lean_log(ax, x=False)
            ax.set_ylim(floor, peak * 3)
            ax.set_xlim(grid[0], grid[-1])
            if not hessian:
                facts.append("GGN: no eigenvalue below 0 (kernel mass mirrored at 0)")
        else:
            ax.text(0.5, 0.5, "no density computed (0 density vectors)", ha="center", va="center",
                    transform=ax.transAxes, color="#7f7f7f")
        for key, color, name in (("lambda_max", "#b22222", "λₘₐₓ"), ("lambda_min", "#d9822b", "λₘᵢₙ")):
            if group.get(key) is not None:
                ax.axvline(group[key], color=color, linestyle="--", linewidth=1.0, label=f"{name} = {fmt(group[key])}")
        lo, hi = ax.get_xlim()
        if hessian and lo < 0 < hi:
            ax.axvline(0.0, color="#7f7f7f", linewidth=0.6)
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("density (log scale)")
        facts.insert(0, f"trace = {fmt(group.get('trace'))} ± {fmt(group.get('trace_stderr'), missing='0')}")
        if group.get("negative_mass") is not None:
            facts.append(f"weight below 0 = {group['negative_mass']:.1%}")
        if group.get("num_params") is not None:
            facts[0] += f", D = {group['num_params']:,}"
        handles, labels = ax.get_legend_handles_labels()
        legend_below(fig, handles, labels, facts, ncol=2)
        fig.tight_layout(rect=(0, strip_height(fig, max(-(-len(labels) // 2), len(facts))), 1, 1))
        return fig


def landscape_figure(land: dict[str, Any], problem: dict[str, Any] | None = None,
                     curvature: str | None = None) -> Figure:
    """The batch loss along the top eigenvector with the quadratic model ``L0 + t g·e + ½ κ t²``, and contours
    over the plane of the top two eigenvectors; the checkpoint (t = 0) is the star of the legend.

    Args:
        land: the report's ``landscape`` section.
        problem: the report's ``problem`` section (the model, N, D and loss under the title).
        curvature: ``hessian`` or ``ggn``: whose eigenvectors (the title says so).
    """
    import numpy as np

    from curvscope.report.render import legend_below, pyplot, strip_height, style, subtitle

    plt = pyplot()
    two_d = land.get("loss_2d") is not None
    whose = {"hessian": "Hessian ", "ggn": "GGN "}.get(str(curvature), "")
    lam = list(land.get("eigenvalues") or []) + [None, None]
    e1 = "e₁" + (f" (λ = {fmt(lam[0])})" if lam[0] is not None else "")
    e2 = "e₂" + (f" (λ = {fmt(lam[1])})" if lam[1] is not None else "")
    with style():
        fig, axes = plt.subplots(1, 2 if two_d else 1, figsize=(9.6 if two_d else 5.6, 4.6), squeeze=False)
        sub = subtitle(problem)
        fig.suptitle(f"Loss landscape around the checkpoint, along the top {whose}eigenvectors"
                     + (f"\n{sub}" if sub else ""), x=0.01, ha="left", fontsize=10)
        ax = axes[0][0]
        t = np.array(land["t"], dtype=float)
        ax.plot(t, land["loss_1d"], color="#1f4e79", linewidth=1.6, label="batch loss")
        ax.plot(t, land["quadratic_1d"], color="#d9822b", linestyle="--", linewidth=1.3,
                label=f"quadratic model (κ = {fmt(land.get('curvature'))})")
        ax.axvline(0.0, color="#7f7f7f", linewidth=0.6)
        star = {"marker": "*", "color": "#b22222", "markersize": 10, "linestyle": "none", "zorder": 5}
        ax.plot([0.0], [land["loss0"]], label=f"checkpoint (loss {fmt(land.get('loss0'), 4)})", **star)
        ax.set_xlabel(f"step t along {e1}")
        ax.set_ylabel("loss")
        ax.set_title("(a) along the top eigenvector", loc="left")
        if two_d:
            ax2 = axes[0][1]
            s, tt = np.array(land["grid_s"], dtype=float), np.array(land["grid_t"], dtype=float)
            z = np.array(land["loss_2d"], dtype=float)
            contours = ax2.contourf(s, tt, z.T, levels=20, cmap="viridis")
            ax2.contour(s, tt, z.T, levels=10, colors="white", linewidths=0.4)
            ax2.plot([0.0], [0.0], **star)
            fig.colorbar(contours, ax=ax2, fraction=0.046, pad=0.04).set_label("batch loss")
            ax2.set_xlabel(f"s along {e1}")
            ax2.set_ylabel(f"t along {e2}")
            ax2.set_title("(b) over the plane of the top two", loc="left")
            ax2.grid(False)
        handles, labels = ax.get_legend_handles_labels()
        legend_below(fig, handles, labels, ncol=3)
        fig.tight_layout(rect=(0, strip_height(fig, 1), 1, 1))
        return fig
