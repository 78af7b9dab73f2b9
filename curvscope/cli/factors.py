"""``curvscope factors``: flags -> :class:`~curvscope.workflows.factors.FactorsOptions` -> run -> report.

The computation is :func:`curvscope.workflows.factors.run_factors`; the report section, tables and plot are
in :mod:`curvscope.report.factors_report` and :mod:`curvscope.report.factors_plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from curvscope.cli.common import (
    handle_errors,
    one_line_paragraphs,
    out,
    progress_bars,
    warn,
)
from curvscope.cli.options import DebugOpt, ProblemArgs, problem_options
from curvscope.cli.root import app

FACTORS_HELP = "Factors"
ENSEMBLE_HELP = "Ensemble ground truth"
FILES_HELP = "Output"


@app.command("factors")
@handle_errors
@problem_options()
def factors(
    args: ProblemArgs,
    symmetry: Annotated[str, typer.Option(
        "--symmetry", help="Weight-space symmetry group of the hidden units: auto (the largest group the "
        "chain's activations allow, said in the summary: orthogonal for linear chains, signed-permutation for "
        "odd activations such as tanh, permutation for the rest, e.g. ReLU), orthogonal, signed-permutation (the "
        "same factors as orthogonal), permutation, or none (the dense second moment; small chains only).",
        rich_help_panel=FACTORS_HELP)] = "auto",
    source: Annotated[str, typer.Option(
        "--source", help="What is projected: batch (the full-batch gradient g g^T, the paper's estimate), "
        "per-sample (mean of g_n g_n^T: a structured empirical Fisher) or ggn (the GGN V V^T from the spectrum "
        "engine's columns).", rich_help_panel=FACTORS_HELP)] = "batch",
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Comma-separated Linear module names forming the chain, in order (e.g. 1,3,5). Default: "
        "the Linear layers of an nn.Sequential MLP.", rich_help_panel=FACTORS_HELP, show_default=False)] = None,
    mc_samples: Annotated[int, typer.Option(
        "--mc-samples", help="--source ggn: 0 for the exact loss-Hessian square root, M > 0 for M Monte-Carlo "
        "columns per sample.", rich_help_panel=FACTORS_HELP)] = 0,
    subsample: Annotated[Optional[int], typer.Option(
        "--subsample", help="--source ggn: build the GGN from the first K samples of the batch only.",
        rich_help_panel=FACTORS_HELP, show_default=False)] = None,
    structure_check: Annotated[bool, typer.Option(
        "--structure-check/--no-structure-check", help="Report the relative Frobenius error between the "
        "per-sample-gradient second moment and its structured projection (skipped for very large N x D).",
        rich_help_panel=FACTORS_HELP)] = True,
    ensemble: Annotated[int, typer.Option(
        "--ensemble", help="Draw M models from the initialization (see --init), compute the ground truth (the "
        "average of their single-gradient factors) and each model's correlation with it. 0: off.",
        rich_help_panel=ENSEMBLE_HELP)] = 0,
    ensemble_checkpoints: Annotated[Optional[str], typer.Option(
        "--ensemble-checkpoints", help="Use the checkpoints matching this glob (quote it, e.g. 'runs/seed*.pt') "
        "as the ensemble instead of drawing models.", rich_help_panel=ENSEMBLE_HELP, show_default=False)] = None,
    init: Annotated[str, typer.Option(
        "--init", help="--ensemble initialization: normal (Linear weights N(0, 1/fan_in), biases zero) or "
        "default (each module's reset_parameters).", rich_help_panel=ENSEMBLE_HELP)] = "normal",
    ensemble_chunk: Annotated[int, typer.Option(
        "--ensemble-chunk", help="Models per vectorized chunk (0: automatic, from a 256 MiB activation budget).",
        rich_help_panel=ENSEMBLE_HELP)] = 0,
    symo_step: Annotated[Optional[Path], typer.Option(
        "--symo-step", help="Write the SymO direction (Sigma + eps I)^(-1/2) g to this safetensors file (one "
        "tensor per parameter, zeros outside the chain; the update is theta - step * direction) and report a "
        "line search: predicted vs realized loss change.", rich_help_panel=FILES_HELP, show_default=False)] = None,
    eps: Annotated[float, typer.Option(
        "--eps", help="Damping of the SymO inverse square root.", rich_help_panel=FILES_HELP)] = 1e-8,
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json (section 'factors'), factors.safetensors and "
        "factors.png (a report of the same problem there is merged, not replaced).",
        rich_help_panel=FILES_HELP)] = Path("curvscope-out"),
    plots: Annotated[bool, typer.Option(
        "--plots/--no-plots", help="Write factors.png: heatmaps of the matrix factors (beside the ground truth "
        "with an ensemble) and a bar chart of the correlations.", rich_help_panel=FILES_HELP)] = True,
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
    from curvscope.workflows.factors import FactorsOptions

    options = FactorsOptions(symmetry=symmetry, source=source, layers=layers, mc_samples=mc_samples,
                             subsample=subsample, structure_check=structure_check, ensemble=ensemble,
                             ensemble_checkpoints=ensemble_checkpoints, init=init, ensemble_chunk=ensemble_chunk,
                             symo_step=symo_step, eps=eps, plots=plots, seed=args.seed)
    options.validate()  # bad options fail before the files load
    problem = args.load()
    with progress_bars() as progress:  # claims the outputs, runs, writes everything together
        report = run_and_write(problem, out_dir, {"factors": options}, progress, warn=warn)
    for table in factors_tables(report["factors"]):
        out.print(table)


factors.__doc__ = one_line_paragraphs(factors.__doc__ or "")
