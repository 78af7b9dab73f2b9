"""The report's ``track`` section (curvature over training) and its summary table, from the workflow's result.

Fields are documented in ``docs/report.md`` (``track``); the figure is :mod:`curvscope.report.track_plots`. The
table and notes are drawn from the section's own fields, so ``curvscope show`` prints a saved report the same way.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from curvscope.report.format import finite_or_none
from curvscope.report.format import num as fmt

POINT_FIELDS = ("loss", "gradient_norm", "lambda_max", "optimizer", "lr", "momentum", "threshold",
                "compared_sharpness", "preconditioned_lambda_max", "sharpness_ratio")
EXTRA_FIELDS = ("trace", "trace_stderr", "lambda_min", "ggn_lambda_max", "hessian_lambda_max")
SHOWN_ROWS = 16
"""A series longer than this is elided in the middle of the summary table (the first and last halves shown)."""


def point_fields(point: Any, curvature: str, measures: list[str]) -> dict[str, Any]:
    """One entry of ``track.points``: a measured point's fields, or the previous report's when reused.

    ``point``: a :class:`curvscope.workflows.track.TrackPoint` (not imported: the workflow imports this module).
    """
    if point.reused and point.previous is not None:
        return {**point.previous, "reused": True}
    m = point.measured
    fields: dict[str, Any] = {"step": point.step, "checkpoint": point.checkpoint, "fingerprint": point.fingerprint}
    for key in POINT_FIELDS:
        value = getattr(m, key)
        fields[key] = value if isinstance(value, str) or value is None else finite_or_none(value)
    fields["curvature"] = curvature
    if m.groups:
        fields["groups"] = {name: finite_or_none(v) for name, v in m.groups.items()}
    wanted = {"trace": ("trace", "trace_stderr"), "bottom": ("lambda_min",), "ggn": ("ggn_lambda_max",),
              "hessian": ("hessian_lambda_max",)}
    for measure in measures:
        for key in wanted.get(measure, ()):
            if key == f"{curvature}_lambda_max":
                continue
            fields[key] = finite_or_none(getattr(m, key))
    fields.update({"products": m.products, "seconds": round(point.seconds, 4), "reused": False,
                   "warm_start": m.warm, "converged": m.converged, "notes": [*point.notes, *m.notes]})
    return fields


def track_section(run: Any, points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report's ``track`` section of a :class:`curvscope.workflows.track.TrackRun` (``points``: its entries,
    already made by :func:`point_fields`; default: made here)."""
    options = run.options
    measures = list(options.measures())
    if points is None:
        points = [point_fields(p, options.curvature, measures) for p in run.points]
    ratios = [p["sharpness_ratio"] for p in points if p.get("sharpness_ratio") is not None]
    sharp = [p["lambda_max"] for p in points if p.get("lambda_max") is not None]
    crossing = next((p["step"] for p in points if (p.get("sharpness_ratio") or 0) >= 1), None)
    computed = [p for p in points if not p.get("reused")]
    return {
        "run": run.run,
        "checkpoints": run.total,
        "complete": run.complete,
        "curvature": options.curvature,
        "groups": options.groups,
        "group_names": run.group_names,
        "measures": measures,
        "warm_start": options.warm_start,
        "tol": options.tol,
        "settings": run.settings,
        "points": points,
        "summary": {
            "points": len(points),
            "reused": len(points) - len(computed),
            "max_lambda_max": max(sharp) if sharp else None,
            "max_sharpness_ratio": max(ratios) if ratios else None,
            "first_step_at_threshold": crossing,
            "products": sum(int(p.get("products") or 0) for p in computed),
            "seconds": round(sum(float(p.get("seconds") or 0.0) for p in computed), 4),
        },
        "notes": list(run.notes),
    }


def _elided(points: list[dict[str, Any]], shown: int = SHOWN_ROWS) -> list[dict[str, Any] | None]:
    """The rows of the table: every point, or the first and last ``shown // 2`` with ``None`` between."""
    if len(points) <= shown:
        return list(points)
    half = shown // 2
    return [*points[:half], None, *points[-half:]]


def sharpness_label(section: dict[str, Any]) -> str:
    """The name of the compared sharpness: λ_max, or P⁻¹H for Adam (the preconditioned one)."""
    kinds = {p.get("optimizer") for p in section.get("points") or []}
    return "λ(P⁻¹H)" if kinds & {"adam", "adamw"} else "λ_max"


def track_table(section: dict[str, Any]) -> Table:
    """One row per point (long series elided in the middle): step, loss, λ_max, the compared sharpness where it
    differs (Adam), threshold and ratio. Fits 80 columns."""
    points = section.get("points") or []
    adam = sharpness_label(section) != "λ_max"
    curvature = "GGN" if section.get("curvature") == "ggn" else "Hessian"
    done = f"{len(points)} of {section.get('checkpoints', len(points))} checkpoints"
    table = Table(title=f"Sharpness over training ({curvature}, {done})", title_justify="left")
    headers = ["step", "loss", "|grad|", "λ_max"] + (["λ(P⁻¹H)"] if adam else []) + ["threshold", "ratio", ""]
    for header in headers:
        table.add_column(header, justify="right" if header else "left", no_wrap=True)
    for p in _elided(points):
        if p is None:
            table.add_row("...", *[""] * (len(headers) - 1))
            continue
        ratio = p.get("sharpness_ratio")
        mark = "[red]edge[/red]" if ratio is not None and ratio >= 1 else ""
        mark += (" " if mark else "") + ("[dim]reused[/dim]" if p.get("reused") else "")
        row = [fmt(p.get("step")), fmt(p.get("loss")), fmt(p.get("gradient_norm")), fmt(p.get("lambda_max"))]
        if adam:
            row.append(fmt(p.get("preconditioned_lambda_max")))
        row += [fmt(p.get("threshold")), fmt(ratio, 2), mark]
        table.add_row(*row)
    return table


def groups_table(section: dict[str, Any]) -> Table | None:
    """The block sharpness of each group at the first and the last point (with ``groups``), or ``None``."""
    names = section.get("group_names") or []
    points = [p for p in section.get("points") or [] if p.get("groups")]
    if not names or not points:
        return None
    first, last = points[0], points[-1]
    table = Table(title="Block sharpness per group (λ_max of its block)", title_justify="left")
    table.add_column("group", no_wrap=True, overflow="ellipsis", max_width=36)
    for header in (f"step {first['step']}", f"step {last['step']}", "growth"):
        table.add_column(header, justify="right", no_wrap=True)
    for name in names:
        a, b = first["groups"].get(name), last["groups"].get(name)
        growth = f"x{fmt(b / a, 2)}" if a and b is not None and a > 0 else "-"
        table.add_row(name, fmt(a), fmt(b), growth)
    return table


def notes(section: dict[str, Any]) -> list[str]:
    """Lines below the table: which sharpness and threshold were compared, the first crossing, reuse."""
    points = section.get("points") or []
    summary = section.get("summary") or {}
    lines = []
    last = next((p for p in reversed(points) if p.get("notes")), None)
    for note in (last or {}).get("notes") or []:
        if note.startswith(("threshold:", "compared:", "optimizer", "preconditioned")):
            lines.append(f"{note} (step {last['step']})")
    crossing = summary.get("first_step_at_threshold")
    if crossing is not None:
        lines.append(f"the sharpness first reaches the threshold at step {crossing} (ratio >= 1: the edge of "
                     "stability)")
    elif summary.get("max_sharpness_ratio") is not None:
        largest = fmt(summary["max_sharpness_ratio"], 2)
        lines.append(f"the sharpness stays below the threshold (largest ratio {largest})")
    if summary.get("reused"):
        lines.append(f"{summary['reused']} point(s) reused from the previous report (unchanged checkpoint and "
                     "options)")
    unconverged = [p["step"] for p in points if p.get("converged") is False]
    if unconverged:
        lines.append(f"Lanczos did not reach the tolerance at step(s) {', '.join(map(str, unconverged[:6]))}")
    if not section.get("complete", True):
        lines.append(f"incomplete: {len(points)} of {section.get('checkpoints')} checkpoints measured")
    work = f"{fmt(summary.get('products'))} products in {fmt(summary.get('seconds'))} s"
    lines.append(f"{summary.get('points', len(points)) - (summary.get('reused') or 0)} point(s) computed: {work}")
    return lines
