"""``curvscope spectrum``: flags -> :class:`~curvscope.workflows.spectrum.SpectrumOptions` -> run -> report.

The computation is :func:`curvscope.workflows.spectrum.run_spectrum`; under ``torchrun`` with several
processes the command runs it collectively (rank 0 alone writes and prints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curvscope.cli.common import (
    console,
    explicit,
    handle_errors,
    out,
    print_report,
    progress_bars,
    quiet_output,
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
from curvscope.errors import CurvscopeError
from curvscope.workflows.spectrum import SpectrumOptions

SPECTRUM_HELP = "Spectrum"
FILES_HELP = "Output"


OPTIONS = (
    flag("groups", "--groups", "-g", panel=SPECTRUM_HELP),
    flag("mc_samples", panel=SPECTRUM_HELP),
    flag("subsample", panel=SPECTRUM_HELP),
    flag("top_k", "--top-k", "-k", panel=SPECTRUM_HELP),
    flag("directions", "--directions/--no-directions", panel=SPECTRUM_HELP),
    flag("max_memory", panel=SPECTRUM_HELP),
    flag("ghost", "--ghost/--no-ghost", panel=SPECTRUM_HELP),
    flag("eigenvectors", panel=FILES_HELP),
    flag("newton_step", panel=FILES_HELP),
    flag("damping", panel=FILES_HELP),
    "out_dir",
    flag("curvature", panel=SPECTRUM_HELP),
    flag("method", panel=SPECTRUM_HELP),
    flag("tol", panel=SPECTRUM_HELP),
    flag("trace_samples", panel=SPECTRUM_HELP),
    flag("density_vectors", panel=SPECTRUM_HELP),
    flag("landscape", panel=FILES_HELP),
    flag("batches", "--batches", "-b", panel=SPECTRUM_HELP),
    flag("plots", "--plots/--no-plots", panel=FILES_HELP),
)
"""The flags of :class:`~curvscope.workflows.spectrum.SpectrumOptions` (defaults and help: its fields)."""


@app.command("spectrum")
@handle_errors
@problem_options()
@workflow_options(SpectrumOptions, OPTIONS)
def spectrum(
    args: ProblemArgs,
    ctx: typer.Context,
    options: SpectrumOptions,
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json, plots and directions.safetensors (a report of "
        "the same problem there is merged, not replaced).", rich_help_panel=FILES_HELP)] = DEFAULT_OUT,
    json_output: ReportJsonOpt = False,
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

    options = options.replace(seed=args.seed)
    launch = distributed.torchrun_env()  # launched by torchrun with several processes: run distributed
    primary = launch is None or launch.primary
    if not primary:
        quiet_output()  # rank 0 alone prints (the summary, and the one error message all ranks agree on)
    options.validate()  # bad options fail before the files load
    if launch is None:
        problem = args.load()
        report = _run(problem, options, out_dir, None, True, keep_other=not explicit(ctx, "out_dir"))
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
            report = _run(problem, options, out_dir, comm, launch.primary, keep_other=not explicit(ctx, "out_dir"))
        finally:
            distributed.shutdown()
    if report is not None:
        from curvscope.report.tables import spectrum_summary

        screen = console if json_output else out
        for table in spectrum_summary(report, str(out_dir), screen.width):
            screen.print(table)
        if json_output:
            print_report(report)


def _run(problem, options, out_dir: Path, comm, primary: bool, keep_other: bool = False):
    """Compute (collectively with ``comm``) and, on the primary process, write every output together."""
    from curvscope.curvature import distributed
    from curvscope.report.writer import ReportWriter
    from curvscope.workflows.spectrum import claim_spectrum, run_spectrum, write_spectrum

    writer = None
    with distributed.stage(comm):
        if primary:
            writer = ReportWriter(out_dir, problem, warn=warn, keep_other=keep_other)
            claim_spectrum(writer, options)
        options.plan(problem)  # refuse what cannot be computed before the bars start
    with progress_bars(quiet=not primary) as progress:
        run = run_spectrum(problem, options, progress, process_group=None if comm is None else comm.group)
        if writer is None:
            return None
        write_spectrum(writer, problem, run, options)
        return writer.commit(progress)
