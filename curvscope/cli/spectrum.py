"""``curvscope spectrum``: flags -> :class:`~curvscope.workflows.spectrum.SpectrumOptions` -> run -> report.

The computation is :func:`curvscope.workflows.spectrum.run_spectrum`; under ``torchrun`` with several
processes the command runs it collectively (rank 0 alone writes and prints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from curvscope.cli.common import (
    handle_errors,
    out,
    progress_bars,
    quiet_output,
    warn,
)
from curvscope.cli.options import DebugOpt, ProblemArgs, problem_options
from curvscope.cli.root import app
from curvscope.errors import CurvscopeError

SPECTRUM_HELP = "Spectrum"
FILES_HELP = "Output"


@app.command("spectrum")
@handle_errors
@problem_options()
def spectrum(
    args: ProblemArgs,
    groups: Annotated[str, typer.Option(
        "--groups", "-g", help="Parameter groups: all (the full GGN), layer (block-diagonal, one block per module "
        "with parameters) or tensor (one block per parameter tensor). With layer/tensor the whole model is "
        "reported first, then the blocks.", rich_help_panel=SPECTRUM_HELP)] = "all",
    mc_samples: Annotated[int, typer.Option(
        "--mc-samples", help="0: exact loss-Hessian square root (N*C columns). M > 0: Monte-Carlo "
        "approximation with M columns per sample (N*M columns).", rich_help_panel=SPECTRUM_HELP)] = 0,
    subsample: Annotated[Optional[int], typer.Option(
        "--subsample", help="Build the curvature from the first K samples of the batch only (the gradient still "
        "uses the whole batch).", rich_help_panel=SPECTRUM_HELP, show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", "-k", help="Directional quantities (and eigenvectors, Newton step) for the top K nonzero "
        "directions. Default: all nonzero, at most 1000.", rich_help_panel=SPECTRUM_HELP,
        show_default=False)] = None,
    directions: Annotated[bool, typer.Option(
        "--directions/--no-directions", help="Compute per-sample directional derivatives gamma_nk, curvatures "
        "lambda_nk, their SNRs and the gradient overlaps (--no-directions: eigenvalues only, a bit faster).",
        rich_help_panel=SPECTRUM_HELP)] = True,
    max_memory: Annotated[str, typer.Option(
        "--max-memory", help="Memory budget for the computation, e.g. 4GiB or 512MB; auto: a quarter of the "
        "available RAM (half of the free GPU memory). Larger batches are split, not refused.",
        rich_help_panel=SPECTRUM_HELP)] = "auto",
    ghost: Annotated[bool, typer.Option(
        "--ghost/--no-ghost", help="Use the fast per-layer Gram rules where cheaper (--no-ghost: the generic "
        "torch.func path for every layer; for debugging).", rich_help_panel=SPECTRUM_HELP)] = True,
    eigenvectors: Annotated[Optional[Path], typer.Option(
        "--eigenvectors", help="Write the top-k eigenvectors of the whole-model GGN to this safetensors file: key "
        "'{k}/{parameter}' (k = 0 for the largest eigenvalue) holds eigenvector k's slice for that parameter, "
        "'eigenvalues' the k eigenvalues.", rich_help_panel=FILES_HELP, show_default=False)] = None,
    newton_step: Annotated[Optional[Path], typer.Option(
        "--newton-step", help="Write the damped Newton step along the eigen-directions (the sum of the per-block "
        "steps with --groups layer/tensor) to this safetensors file, one tensor per parameter; its predicted and "
        "realized loss decrease go into the report.", rich_help_panel=FILES_HELP, show_default=False)] = None,
    damping: Annotated[str, typer.Option(
        "--damping", help="Damping for --newton-step: a constant delta >= 0 (in units of "
        "curvature, added to every eigenvalue), or bootstrap: a per-direction delta_k picked by the 5th "
        "percentile of the bootstrapped predicted decrease (ViViT), skipping directions with no reliable "
        "decrease.", rich_help_panel=FILES_HELP)] = "bootstrap",
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json, plots and directions.safetensors (a report of "
        "the same problem there is merged, not replaced).", rich_help_panel=FILES_HELP)] = Path("curvscope-out"),
    curvature: Annotated[str, typer.Option(
        "--curvature", help="ggn, or hessian: the loss Hessian by Lanczos on Hessian-vector products (both ends "
        "of its spectrum, a Hutch++ trace, an SLQ density), with the GGN's lambda_max and trace beside it.",
        rich_help_panel=SPECTRUM_HELP)] = "ggn",
    method: Annotated[str, typer.Option(
        "--method", help="gram (exact: every eigenvalue, from the N*C x N*C Gram), lanczos (matrix-free: the "
        "--top-k extremes, Hutch++ trace, SLQ density) or auto: gram when it fits --max-memory, else lanczos.",
        rich_help_panel=SPECTRUM_HELP)] = "auto",
    tol: Annotated[float, typer.Option(
        "--tol", help="Lanczos: converged when every residual is below tol * |lambda_max|.",
        rich_help_panel=SPECTRUM_HELP)] = 1e-6,
    trace_samples: Annotated[int, typer.Option(
        "--trace-samples", help="Lanczos: products for the Hutch++ trace (exact when at least the group's "
        "parameter count).", rich_help_panel=SPECTRUM_HELP)] = 60,
    density_vectors: Annotated[int, typer.Option(
        "--density-vectors", help="Lanczos: random vectors of the SLQ spectral density (0: none).",
        rich_help_panel=SPECTRUM_HELP)] = 4,
    landscape: Annotated[bool, typer.Option(
        "--landscape", help="Also write landscape.png: the batch loss along the top eigenvector with the "
        "quadratic model, and over the plane of the top two.", rich_help_panel=FILES_HELP)] = False,
    plots: Annotated[bool, typer.Option(
        "--plots/--no-plots", help="Write spectrum.png, directions.png and (with --groups layer/tensor) "
        "layers.png.", rich_help_panel=FILES_HELP)] = True,
    debug: DebugOpt = False,
) -> None:
    """Exact GGN eigenspectrum of a batch, with per-sample directional derivatives and their noise.

    Computes the nonzero eigenvalues of the generalized Gauss-Newton matrix through its Gram matrix (never the
    D x D matrix), the gradient and curvature along the top eigenvectors with their signal-to-noise ratios
    (ViViT), writes DIR/report.json, plots and DIR/directions.safetensors, and prints a summary.

    Example:
    [bold]curvscope spectrum sample_models/mlp-digits.safetensors --data sample_models/digits.safetensors
    --batch-size 64 --groups layer --newton-step step.safetensors[/bold]
    """
    from curvscope.curvature import distributed
    from curvscope.workflows.spectrum import SpectrumOptions

    options = SpectrumOptions(groups=groups, mc_samples=mc_samples, subsample=subsample, top_k=top_k,
                              directions=directions, eigenvectors=eigenvectors, newton_step=newton_step,
                              damping=damping, max_memory=max_memory, ghost=ghost, plots=plots, seed=args.seed,
                              curvature=curvature, method=method, tol=tol, trace_samples=trace_samples,
                              density_vectors=density_vectors, landscape=landscape)
    launch = distributed.torchrun_env()  # launched by torchrun with several processes: run distributed
    primary = launch is None or launch.primary
    if not primary:
        quiet_output()  # rank 0 alone prints (the summary, and the one error message all ranks agree on)
    options.validate()  # bad options fail before the files load
    if launch is None:
        problem = args.load()
        report = _run(problem, options, out_dir, None, True)
    else:
        try:
            rank_device = distributed.launch_device(launch, args.device)
        except distributed.LocalRankError as exc:  # too few GPUs on this rank's node: only this rank can say so
            quiet_output(False)
            raise CurvscopeError(f"rank {launch.rank}: {exc}") from exc
        try:
            comm = distributed.Comm.create(distributed.init_from_env(launch, rank_device), rank_device)
            with comm.stage():  # a file missing on one node ends every rank with that message
                problem = args.load(device=str(rank_device))
            report = _run(problem, options, out_dir, comm, launch.primary)
        finally:
            distributed.shutdown()
    if report is not None:
        from curvscope.report.tables import spectrum_summary

        for table in spectrum_summary(report, str(out_dir), out.width):
            out.print(table)


def _run(problem, options, out_dir: Path, comm, primary: bool):
    """Compute (collectively with ``comm``) and, on the primary process, write every output together."""
    from curvscope.curvature import distributed
    from curvscope.report.writer import ReportWriter
    from curvscope.workflows.spectrum import claim_spectrum, run_spectrum, write_spectrum

    writer = None
    with distributed.stage(comm):
        if primary:
            writer = ReportWriter(out_dir, problem, warn=warn)
            claim_spectrum(writer, options)
        options.check_problem(problem)
    with progress_bars(quiet=not primary) as progress:
        run = run_spectrum(problem, options, progress, process_group=None if comm is None else comm.group)
        if writer is None:
            return None
        write_spectrum(writer, problem, run, options)
        return writer.commit(progress)
