"""``curvscope lr-suggest``: per-group learning rates from the reduced Hessian H-bar and g-hat (Wolinski), the
stability bounds of the GGN spectrum, and a truth test of every rate set by the realized loss change.

:func:`run_lr` does the work (compute, then write ``report.json``'s ``lr`` section and ``lr.png``) and is
shared with ``curvscope check``; the typer command builds the Problem, calls it and prints the tables (and,
with ``--emit``, the rates as code).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from curvscope.cli.root import app
from curvscope.cli.common import (
    BatchSizeOpt,
    CheckpointArg,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    LossOpt,
    ModelKwargsOpt,
    ModelOpt,
    SeedOpt,
    ShuffleOpt,
    build_problem,
    console,
    handle_errors,
    out,
)
from curvscope.errors import CurvscopeError

LR_HELP = "Learning rates"
OUTPUT_HELP = "Output"
PLOT_NAME = "lr.png"
EMITS = ("none", "torch", "json")

DEFAULTS: dict[str, Any] = {
    "partition": "layer",
    "direction": "gradient",
    "curvature": "hessian",
    "ridge": 0.0,
    "batches": 1,
    "holdout": 0,
    "cubic": False,
    "cubic_weight": 1.0,
    "emit": "none",
    "plot": True,
}
"""``run_lr`` options and their defaults (the command's)."""
IGNORED = {"checkpoint", "data", "model", "model_kwargs", "batch_size", "shuffle", "seed", "loss", "device",
           "dtype", "debug", "out_dir"}

# -- the work, shared with `curvscope check` ----------------------------------------------------------------

def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    for key, value in (options or {}).items():
        if key in DEFAULTS:
            opts[key] = value
        elif key == "no_plot":
            opts["plot"] = not value
        elif key not in IGNORED:
            raise CurvscopeError(f"lr-suggest: unknown option '{key}' (known: {', '.join(DEFAULTS)})")
    return opts


def _validate(opts: dict[str, Any], out_dir: Path) -> None:
    """What only the command checks (the engine checks its own options before computing anything)."""
    if opts["emit"] not in EMITS:
        raise CurvscopeError(f"--emit '{opts['emit']}': choose one of {', '.join(EMITS)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise CurvscopeError(f"--out {out_dir}: exists and is not a directory")


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Any]:
    """A ``progress(message)`` callback showing a spinner with the current stage on stderr."""
    if quiet:
        yield lambda _msg: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("learning rates", total=None)
        yield lambda msg: bar.update(task, description=escape(msg))


def _num(x: Any) -> float | None:
    """A finite float or None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def lr_section(result) -> dict[str, Any]:
    """The report's ``lr`` section from an :class:`~curvscope.curvature.lr.LRResult` (formatting only)."""
    from curvscope.curvature.lr import RECOMMENDED_RULE

    main = result.main
    stats = result.statistics() if len(result.batches) > 1 else {}
    groups = []
    for s, group in enumerate(result.groups):
        row: dict[str, Any] = {
            "name": group.name,
            "parameters": list(group.param_names),
            "num_params": result.num_params[s],
            "g_hat": _num(main.g_hat[s]),
            "h_bar_diag": _num(main.h_bar[s, s]),
            "lr_newton": _num(main.lr_newton[s]),
            "lr_diag": _num(main.lr_diag[s]),
            "diag_note": main.diag_notes[s],
            "lambda_max": _num(main.lambda_max[s]),
            "lr_stability": _num(main.lr_stability[s]),
            "recommended": _num(main.recommended[s]),
            "rule": main.rules[s],
        }
        if main.lr_cubic is not None:
            row["lr_cubic"] = _num(main.lr_cubic[s])
        if main.d3 is not None:
            row["d3"] = _num(main.d3[s])
        noisy = []
        for name, st in stats.items():
            row[f"{name}_mean"] = _num(st.mean[s])
            row[f"{name}_std"] = _num(st.std[s])
            if st.noisy[s]:
                noisy.append(name)
        if stats:
            row["noisy"] = noisy
        groups.append(row)
    rec = main.steps["recommended"]
    section: dict[str, Any] = {
        "partition": result.partition,
        "curvature": result.curvature,
        "direction": result.direction,
        "ridge": result.ridge,
        "rule": RECOMMENDED_RULE,
        "g_hat": main.g_hat,
        "h_bar": main.h_bar,
        "h_bar_eigenvalues": main.h_bar_eigenvalues,
        "h_bar_positive_definite": main.h_bar_positive_definite,
        "h_bar_correlation": main.h_bar_correlation,
        "newton_eta": main.newton_eta,
        "newton_note": main.newton_note,
        "lambda_max_global": _num(main.lambda_max_global),
        "lr_stability_global": _num(main.lr_stability_global),
        "groups": groups,
        "loss_before": main.loss_before,
        "predicted_decrease": rec.predicted,
        "realized_decrease": rec.realized,
        "realized_decrease_holdout": rec.realized_holdout,
        "halvings": main.halvings,
        "steps": {name: {"rates": c.rates, "predicted_decrease": c.predicted, "realized_decrease": c.realized,
                         "realized_decrease_holdout": c.realized_holdout,
                         **({"predicted_decrease_cubic": c.predicted_cubic} if c.predicted_cubic is not None
                            else {})}
                  for name, c in main.steps.items()},
        "batches": len(result.batches),
        "holdout": result.holdout_size,
        "per_batch": [{"batch_indices": b.batch_indices, "loss_before": b.loss_before,
                       "recommended": b.recommended, "realized_decrease": b.steps["recommended"].realized,
                       "h_bar_positive_definite": b.h_bar_positive_definite} for b in result.batches],
    }
    if result.cubic_weight is not None:
        section["cubic"] = {"weight": result.cubic_weight, "note": main.cubic_note, "eta": main.cubic_eta}
    return section


def run_lr(problem, out_dir: Path, options: dict[str, Any] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Compute per-group learning rates for ``problem``, write ``out_dir/report.json`` (section ``lr``, merged
    into a report of the same problem) and ``out_dir/lr.png``; return the ``lr`` section (JSON-able).

    Args:
        options: the command's options in snake_case (``partition``, ``direction``, ``curvature``, ``ridge``,
            ``batches``, ``holdout``, ``cubic``, ``cubic_weight``, ``emit``, ``plot``); missing keys take
            :data:`DEFAULTS`; problem options (``batch_size``, ...) are ignored. ``emit`` only matters to the
            command (it prints the rates).
        quiet: no progress spinner.

    Nothing is written when the computation fails; ``report.json`` is written last.
    """
    from curvscope.curvature.lr import suggest_lr
    from curvscope.io.atomic import write_atomic
    from curvscope.report.schema import build_report, write_report

    out_dir = Path(out_dir)
    opts = _options(options)
    _validate(opts, out_dir)
    with _progress(quiet) as progress:
        result = suggest_lr(problem, partition=opts["partition"], curvature=opts["curvature"],
                            direction=opts["direction"], ridge=opts["ridge"], batches=opts["batches"],
                            holdout=opts["holdout"], cubic=bool(opts["cubic"]), cubic_weight=opts["cubic_weight"],
                            progress=progress)
        report = build_report("lr-suggest", problem, {"lr": lr_section(result)})
        section = report["lr"]
        if opts["plot"]:
            progress("plot")
            from curvscope.report.lr_plots import lr_figure, render_png

            png = render_png(lr_figure(section, report["problem"]))
            section["plot"] = str(out_dir / PLOT_NAME)
            try:
                write_atomic(out_dir / PLOT_NAME, lambda tmp: tmp.write_bytes(png))
            except OSError as exc:
                raise CurvscopeError(f"{out_dir / PLOT_NAME}: cannot write ({exc.strerror or exc})") from exc
        write_report(out_dir, report)
    return section


# -- presentation -------------------------------------------------------------------------------------------

def _fmt(x: Any, missing: str = "-", digits: int = 3) -> str:
    """A number in at most 7 characters (``.3g``, else ``1.2e-05``; with ``digits=2``: 6, ``1e-05``)."""
    if x is None:
        return missing
    text = f"{x:.{digits}g}"
    return text if len(text) <= 4 + digits else f"{x:.{digits - 2}e}"


def _rate_cell(row: dict[str, Any], key: str, missing: str = "-") -> str:
    """The rate, and under it ``±std`` over the batches (red with ``!`` when std > mean)."""
    text = _fmt(row.get(key), missing)
    std = row.get(f"{key}_std")
    if std is not None:
        text += f"\n±{_fmt(std, digits=2)}"
        if key in row.get("noisy", []):
            text = f"[red]{text}![/red]"
    return text


def rule_legend(section: dict[str, Any]) -> list[str]:
    """The distinct rules of the recommended rates, in order of first use (the table cites them by number)."""
    return list(dict.fromkeys(row["rule"] for row in section["groups"]))


def rates_table(section: dict[str, Any]) -> Table:
    """Per-group table: group, #params, g-hat, H-bar_ss, then the rates lr_newton, lr_diag, lr_stability,
    (lr_cubic), recommended, and the number of the rule that gave the recommended rate (:func:`rule_legend`)."""
    batches = section["batches"]
    title = (f"Learning rates per {section['partition']} group ({section['curvature']}, direction "
             f"{section['direction']})")
    if batches > 1:
        title += f"; ±std over {batches} batches, ! = std > mean"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    table.add_column("group", overflow="fold", min_width=6)
    headers = ["#params", "g-hat", "H-bar_ss", "lr_newton", "lr_diag", "lr_stability"]
    cubic = "cubic" in section
    if cubic:
        headers.append("lr_cubic")
    for name in headers:
        table.add_column(name.replace("lr_", "lr_\n"), justify="right", no_wrap=True)
    table.add_column("recom-\nmended", justify="right", style="bold", no_wrap=True)
    table.add_column("rule", justify="right", no_wrap=True)
    legend = rule_legend(section)
    newton_missing = "n/a" if section["newton_eta"] is None else "<=0"
    for row in section["groups"]:
        moves = not row["diag_note"].startswith("zero gradient")
        cells = [escape(row["name"]), f"{row['num_params']:,}", _fmt(row["g_hat"]), _fmt(row["h_bar_diag"]),
                 _rate_cell(row, "lr_newton", newton_missing if moves else "n/a"), _rate_cell(row, "lr_diag", "n/a"),
                 _rate_cell(row, "lr_stability", "n/a")]
        if cubic:
            cells.append(_rate_cell(row, "lr_cubic", "n/a"))
        cells += [_rate_cell(row, "recommended"), f"[{legend.index(row['rule']) + 1}]"]
        table.add_row(*cells)
    return table


def truth_table(section: dict[str, Any]) -> Table:
    """Each rate set as a step: predicted and realized loss decrease (batch, holdout)."""
    holdout = section["holdout"] > 0
    table = Table(title=f"Truth test: take the step, re-evaluate the loss (before: {section['loss_before']:.6g})",
                  title_justify="left")
    table.add_column("rates")
    table.add_column("predicted decrease", justify="right")
    table.add_column("realized (batch)", justify="right")
    if holdout:
        table.add_column(f"realized (holdout {section['holdout']})", justify="right")
    if "cubic" in section:
        table.add_column("predicted (cubic model)", justify="right")
    for name, step in section["steps"].items():
        realized = step["realized_decrease"]
        style = "green" if realized is not None and realized > 0 else "red"
        cells = [name, _fmt(step["predicted_decrease"]), f"[{style}]{_fmt(realized)}[/{style}]"]
        if holdout:
            cells.append(_fmt(step["realized_decrease_holdout"]))
        if "cubic" in section:
            cells.append(_fmt(step.get("predicted_decrease_cubic")))
        table.add_row(*cells)
    return table


def notes(section: dict[str, Any]) -> list[str]:
    """One-line remarks under the tables (H-bar definiteness, Newton, stability)."""
    lines = [f"rule [{i}]: {escape(rule)}" for i, rule in enumerate(rule_legend(section), start=1)]
    evals = section["h_bar_eigenvalues"]
    if section["h_bar_positive_definite"]:
        lines.append(f"H-bar is positive definite (eigenvalues {_fmt(evals[0])} .. {_fmt(evals[-1])}).")
    else:
        lines.append(f"[yellow]H-bar is NOT positive definite[/yellow] (smallest eigenvalue {_fmt(evals[0])}): "
                     "the quadratic model has no minimum; joint Newton rates are not defined.")
    if section["newton_note"] != "ok":
        lines.append(f"joint Newton: {escape(section['newton_note'])}")
    if section["lr_stability_global"] is not None:
        lines.append(f"whole-model stability bound 2/lambda_max(G) = {section['lr_stability_global']:.4g} "
                     f"(lambda_max = {section['lambda_max_global']:.4g})")
    if "cubic" in section and section["cubic"]["note"] != "ok":
        lines.append(f"cubic: {escape(str(section['cubic']['note']))}")
    return lines


def emit_torch(section: dict[str, Any]) -> str:
    """Python source: ``optimizer = torch.optim.SGD([...])``, one param group per group with its recommended
    rate (needs ``model`` in scope)."""
    lines = [f"# curvscope lr-suggest: recommended rates, one param group per {section['partition']} group",
             "import torch", "", "optimizer = torch.optim.SGD(["]
    for row in section["groups"]:
        params = ", ".join(f"model.get_parameter({n!r})" for n in row["parameters"])
        lines.append(f"    {{\"params\": [{params}], \"lr\": {row['recommended']!r}}},  # {row['name']}: "
                     f"{row['rule']}")
    lines.append("])")
    return "\n".join(lines)


def emit_json(section: dict[str, Any]) -> str:
    """JSON object: parameter name -> recommended rate."""
    return json.dumps({n: row["recommended"] for row in section["groups"] for n in row["parameters"]}, indent=2)


# -- the command ---------------------------------------------------------------------------------------------

@app.command("lr-suggest")
@handle_errors
def lr_suggest(
    checkpoint: CheckpointArg = None,
    data: DataOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    batch_size: BatchSizeOpt = 128,
    shuffle: ShuffleOpt = False,
    seed: SeedOpt = 0,
    loss: LossOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    partition: Annotated[str, typer.Option(
        "--partition", "-p", help="Parameter groups, one rate each: layer (one per module with parameters), "
        "tensor (one per parameter tensor) or all (a single rate).", rich_help_panel=LR_HELP)] = "layer",
    direction: Annotated[str, typer.Option(
        "--direction", help="Step direction u: gradient (plain SGD) or symo (the SymO direction of the factors "
        "engine).", rich_help_panel=LR_HELP)] = "gradient",
    curvature: Annotated[str, typer.Option(
        "--curvature", help="H in H-bar = u_s^T H u_t: hessian (as in the paper; may be indefinite) or ggn "
        "(generalized Gauss-Newton, always PSD).", rich_help_panel=LR_HELP)] = "hessian",
    ridge: Annotated[float, typer.Option(
        "--ridge", help="Added to H-bar's diagonal for the joint Newton rates (H-bar + ridge I)^-1 g-hat (>= 0).",
        rich_help_panel=LR_HELP)] = 0.0,
    batches: Annotated[int, typer.Option(
        "--batches", "-b", help="Repeat on B disjoint batches of --batch-size (the batch, then the next samples "
        "in the same order) and report each rate's mean and std; a rate whose std exceeds its mean is flagged.",
        rich_help_panel=LR_HELP)] = 1,
    holdout: Annotated[int, typer.Option(
        "--holdout", help="Also measure each step's realized loss decrease on N other samples (after the "
        "batches).", rich_help_panel=LR_HELP)] = 0,
    cubic: Annotated[bool, typer.Option(
        "--cubic/--no-cubic", help="Also compute the order-3 diagonal d3_s = d^3 L/d eta_s^3 and the rates "
        "minimizing the cubic-regularized model -eta.g + eta.H.eta/2 + w/6 sum |d3_s| |eta_s|^3.",
        rich_help_panel=LR_HELP)] = False,
    cubic_weight: Annotated[float, typer.Option(
        "--cubic-weight", help="Weight w of the cubic term (> 0).", rich_help_panel=LR_HELP)] = 1.0,
    emit: Annotated[str, typer.Option(
        "--emit", help="Print the recommended rates as code on stdout (tables go to stderr then): torch (a "
        "torch.optim.SGD([...]) with one param group per group; needs `model` in scope) or json (parameter "
        "name -> rate).", rich_help_panel=OUTPUT_HELP)] = "none",
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json (section 'lr'; a report of the same problem "
        "there is merged, not replaced) and lr.png.", rich_help_panel=OUTPUT_HELP)] = Path("curvscope-out"),
    plot: Annotated[bool, typer.Option(
        "--plot/--no-plot", help="Write lr.png: rates per group on a log axis and H-bar as a correlation "
        "heatmap.", rich_help_panel=OUTPUT_HELP)] = True,
    debug: DebugOpt = False,
) -> None:
    """Per-layer learning rates from the reduced Hessian, checked by the realized loss change.

    For S parameter groups and the step theta - sum_s eta_s u_s (u: the gradient, or the SymO direction), computes g-hat_s = g_s.u_s and the S x S matrix H-bar_st = u_s.H.u_t exactly with S batched Hessian- or Jacobian-vector products (Wolinski). From them: the joint Newton rates (H-bar + ridge I)^-1 g-hat, the diagonal rates g-hat_s / H-bar_ss, the stability bounds 2/lambda_max of each group's GGN block and of the whole GGN, and a recommended rate per group. Every rate set is then taken as a step and the loss re-evaluated: predicted versus realized decrease (also on --holdout samples).

    Recommended rule: the joint Newton rates when those of all moving groups are positive; otherwise the diagonal rates, all scaled by the best common factor t <= 1 of the quadratic model; a group with neither (zero gradient, H-bar_ss <= 0) falls back to its stability bound; every rate is capped at its block bound 2/lambda_max(G_PP); finally all are halved until the batch loss decreases. Never zero, negative or infinite; the table says which rule applied to each group.

    Writes DIR/report.json (section lr) and DIR/lr.png; --emit torch|json prints the rates as a ready-to-paste optimizer or a JSON mapping.

    Example: [bold]curvscope lr-suggest sample_models/mlp-digits.safetensors --data sample_models/digits.safetensors --batch-size 64 --batches 3 --emit torch[/bold]
    """  # noqa: E501
    problem = build_problem(checkpoint, data, model, model_kwargs, batch_size, shuffle, seed, loss, device,
                            dtype)
    section = run_lr(problem, out_dir, {
        "partition": partition, "direction": direction, "curvature": curvature, "ridge": ridge,
        "batches": batches, "holdout": holdout, "cubic": cubic, "cubic_weight": cubic_weight, "emit": emit,
        "plot": plot,
    })
    screen = console if emit != "none" else out
    screen.print(rates_table(section))
    screen.print(truth_table(section))
    for line in notes(section):
        screen.print(line, soft_wrap=True)
    written = f"report: {out_dir / 'report.json'}" + (f", plot: {section['plot']}" if "plot" in section else "")
    screen.print(escape(written), soft_wrap=True)
    if emit == "torch":
        typer.echo(emit_torch(section))
    elif emit == "json":
        typer.echo(emit_json(section))
