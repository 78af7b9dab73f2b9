"""``curvscope lr-suggest``: flags -> :class:`~curvscope.workflows.lr.LrOptions` -> run -> report.

The computation is :func:`curvscope.workflows.lr.run_lr`; the report section, tables and ``--emit`` code are
made by :mod:`curvscope.report.lr_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from curvscope.cli.common import (
    console,
    explicit,
    handle_errors,
    one_line_paragraphs,
    out,
    progress_bars,
    warn,
)
from curvscope.cli.options import DEFAULT_OUT, DebugOpt, ProblemArgs, flag, problem_options, workflow_options
from curvscope.cli.root import app
from curvscope.workflows.lr import LrOptions

LR_HELP = "Learning rates"
OUTPUT_HELP = "Output"
EMITS = ("none", "torch", "json")

HELP = """Per-layer learning rates from the reduced Hessian, checked by the realized loss change.

For S parameter groups and the step theta - sum_s eta_s u_s (u: the gradient, or the SymO direction), computes
g-hat_s = g_s.u_s and the S x S matrix H-bar_st = u_s.H.u_t exactly with S batched Hessian- or Jacobian-vector
products (Wolinski). From them: the joint Newton rates (H-bar + ridge I)^-1 g-hat, the diagonal rates
g-hat_s / H-bar_ss, the stability bounds 2/lambda_max of each group's GGN block and of the whole GGN, and a
recommended rate per group. Every rate set is then taken as a step and the loss re-evaluated: predicted versus
realized decrease (also on --holdout samples).

Recommended rule: the joint Newton rates when those of all moving groups are positive; otherwise the diagonal
rates, all scaled by the best common factor t <= 1 of the quadratic model; a group with neither (zero gradient,
H-bar_ss <= 0) falls back to its stability bound; every rate is capped at its block bound 2/lambda_max(G_PP);
finally all are halved until the batch loss decreases. Never zero, negative or infinite; the table says which
rule applied to each group.

Writes DIR/report.json (section lr) and DIR/lr.png; --emit torch|json prints the rates as a ready-to-paste
optimizer or a JSON mapping.

Example: [bold]curvscope lr-suggest sample_models/mlp-digits.safetensors --data sample_models/digits.safetensors
--batch-size 64 --batches 3 --emit torch[/bold]
"""


OPTIONS = (
    flag("partition", "--partition", "-p", panel=LR_HELP),
    flag("direction", panel=LR_HELP),
    flag("curvature", panel=LR_HELP),
    flag("ridge", panel=LR_HELP),
    flag("batches", "--batches", "-b", panel=LR_HELP),
    flag("holdout", panel=LR_HELP),
    flag("cubic", "--cubic/--no-cubic", panel=LR_HELP),
    flag("cubic_weight", panel=LR_HELP),
    "emit",
    "out_dir",
    flag("plot", "--plot/--no-plot", panel=OUTPUT_HELP),
)
"""The flags of :class:`~curvscope.workflows.lr.LrOptions` (defaults and help: its fields)."""


@app.command("lr-suggest", help=one_line_paragraphs(HELP))
@handle_errors
@problem_options()
@workflow_options(LrOptions, OPTIONS)
def lr_suggest(
    args: ProblemArgs,
    ctx: typer.Context,
    options: LrOptions,
    emit: Annotated[str, typer.Option(
        "--emit", help="Print the recommended rates as code on stdout (tables go to stderr then): torch (a "
        "torch.optim.SGD([...]) with one param group per group; needs `model` in scope) or json (parameter "
        "name -> rate).", rich_help_panel=OUTPUT_HELP)] = "none",
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json (section 'lr'; a report of the same problem "
        "there is merged, not replaced) and lr.png.", rich_help_panel=OUTPUT_HELP)] = DEFAULT_OUT,
    debug: DebugOpt = False,
) -> None:
    """Per-layer learning rates from the reduced Hessian (help text: :data:`HELP`)."""
    from curvscope.report.lr_report import emit_json, emit_torch, notes, rates_tables, truth_table
    from curvscope.report.writer import ReportWriter
    from curvscope.workflows.lr import run_lr, write_lr
    from curvscope.workflows.options import one_of

    options.validate()  # bad options fail before the files load
    one_of("emit", emit, EMITS)
    problem = args.load()
    writer = ReportWriter(out_dir, problem, warn=warn, keep_other=not explicit(ctx, "out_dir"))
    with progress_bars() as progress:
        result = run_lr(problem, options, progress)
        write_lr(writer, problem, result, options)
        report = writer.commit(progress)

    section = report["lr"]
    screen = console if emit != "none" else out
    for table in rates_tables(section, screen.width):
        screen.print(table)
    screen.print(truth_table(section))
    for line in notes(section):
        screen.print(line, soft_wrap=True)
    plot_path = report["files"].get("lr_plot")
    written = f"report: {writer.report_path}" + (f", plot: {plot_path}" if plot_path else "")
    screen.print(escape(written), soft_wrap=True)
    if emit == "torch":
        typer.echo(emit_torch(section))
    elif emit == "json":
        typer.echo(emit_json(section))
