"""``curvscope factors``: flags -> :class:`~curvscope.workflows.factors.FactorsOptions` -> run -> report.

The computation is :func:`curvscope.workflows.factors.run_factors`; the report section, tables and plot are
in :mod:`curvscope.report.factors_report` and :mod:`curvscope.report.factors_plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curvscope.cli.common import (
    console,
    explicit,
    handle_errors,
    one_line_paragraphs,
    out,
    print_report,
    progress_bars,
    warn,
)
from curvscope.cli.options import (
    DEFAULT_OUT,
    DebugOpt,
    ProblemArgs,
    ReportJsonOpt,
    flag,
    problem_options,
    workflow_options,
)
from curvscope.cli.root import app
from curvscope.workflows.factors import FactorsOptions

FACTORS_HELP = "Factors"
ENSEMBLE_HELP = "Ensemble ground truth"
FILES_HELP = "Output"


OPTIONS = (
    flag("symmetry", panel=FACTORS_HELP),
    flag("source", panel=FACTORS_HELP),
    flag("layers", panel=FACTORS_HELP),
    flag("mc_samples", panel=FACTORS_HELP),
    flag("subsample", panel=FACTORS_HELP),
    flag("structure_check", "--structure-check/--no-structure-check", panel=FACTORS_HELP),
    flag("ensemble", panel=ENSEMBLE_HELP),
    flag("ensemble_checkpoints", panel=ENSEMBLE_HELP),
    flag("init", panel=ENSEMBLE_HELP),
    flag("ensemble_chunk", panel=ENSEMBLE_HELP),
    flag("symo_step", panel=FILES_HELP),
    flag("eps", panel=FILES_HELP),
    "out_dir",
    flag("plots", "--plots/--no-plots", panel=FILES_HELP),
)
"""The flags of :class:`~curvscope.workflows.factors.FactorsOptions` (defaults and help: its fields)."""


@app.command("factors")
@handle_errors
@problem_options()
@workflow_options(FactorsOptions, OPTIONS)
def factors(
    args: ProblemArgs,
    ctx: typer.Context,
    options: FactorsOptions,
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json (section 'factors'), factors.safetensors and "
        "factors.png (a report of the same problem there is merged, not replaced).",
        rich_help_panel=FILES_HELP)] = DEFAULT_OUT,
    json_output: ReportJsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Symmetry-structured curvature factors of a Linear chain, their ensemble ground truth, and SymO.

    Averaging the gradient's second moment over a weight-space symmetry group (permuting, sign-flipping or
    rotating hidden units) leaves a few small factors: Phi_1 (input x input), Phi_L (output x output), scalars
    for hidden-to-hidden weights and Psi_1 coupling the two layers of a two-layer net (Bernacchia; conventions
    in docs/conventions.md section 7). From a single gradient they estimate the global curvature; --ensemble
    measures how well, against the average over many models; --symo-step writes the preconditioned direction.

    Example:
    [bold]curvscope factors sample_models/mlp-digits.safetensors --data sample_models/digits.safetensors
    --symo-step symo.safetensors[/bold]

    Ensemble from the initialization (no checkpoint):
    [bold]curvscope factors --model mlp --model-kwargs '{"hidden": [128], "activation": "tanh"}'
    --data sample_models/digits.safetensors --batch-size 1797 --ensemble 200[/bold]
    """
    from curvscope.report.factors_report import factors_tables
    from curvscope.workflows import run_and_write

    options = options.replace(seed=args.seed)
    options.validate()  # bad options fail before the files load
    problem = args.load()
    with progress_bars() as progress:  # claims the outputs, runs, writes everything together
        report = run_and_write(problem, out_dir, {"factors": options}, progress, warn=warn,
                               keep_other=not explicit(ctx, "out_dir"))
    screen = console if json_output else out
    for table in factors_tables(report["factors"]):
        screen.print(table)
    if json_output:
        print_report(report)


factors.__doc__ = one_line_paragraphs(factors.__doc__ or "")
