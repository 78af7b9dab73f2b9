"""``curvscope spectrum``: the exact GGN eigenspectrum of a batch, directional derivatives and their noise,
a damped Newton step, plots and a JSON report.

:func:`run_spectrum` does the work (compute, then write everything) and is shared with ``curvscope check``; the
typer command only builds the Problem, calls it and prints the summary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

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
    quiet_output,
)
from curvscope.errors import CurvscopeError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SPECTRUM_HELP = "Spectrum"
FILES_HELP = "Output"

DEFAULTS: dict[str, Any] = {
    "groups": "all",
    "mc_samples": 0,
    "subsample": None,
    "top_k": None,
    "directions": True,
    "eigenvectors": None,
    "newton_step": None,
    "damping": "bootstrap",
    "max_memory": "auto",
    "ghost": True,
    "plots": True,
    "seed": None,
}
"""``run_spectrum`` options and their defaults (the command's). ``seed`` None: the problem's seed (else 0)."""

FILE_NAMES = {"spectrum_plot": "spectrum.png", "directions_plot": "directions.png", "layers_plot": "layers.png",
              "directions": "directions.safetensors"}


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    for key, value in (options or {}).items():
        if key.startswith("no_") and key[3:] in ("directions", "ghost", "plots"):
            opts[key[3:]] = not value
        elif key in DEFAULTS:
            opts[key] = value
        else:
            raise ValueError(f"run_spectrum: unknown option '{key}' (known: {', '.join(DEFAULTS)})")
    return opts


def _validate_options(opts: dict[str, Any], check_files: bool = True) -> dict[str, Any]:
    """Check the options that need no Problem (before anything is loaded); returns parsed values.
    ``check_files=False``: leave out the checks of output paths (ranks other than 0 write nothing)."""
    from curvscope.curvature.memory import parse_memory
    from curvscope.curvature.newton import parse_damping
    from curvscope.io.atomic import check_writable
    from curvscope.problem import GROUP_MODES

    if opts["groups"] not in GROUP_MODES:
        raise CurvscopeError(f"--groups '{opts['groups']}': choose one of {', '.join(GROUP_MODES)}")
    if opts["mc_samples"] is None or opts["mc_samples"] < 0:
        raise CurvscopeError(f"--mc-samples must be 0 (exact) or positive, got {opts['mc_samples']}")
    if opts["subsample"] is not None and opts["subsample"] < 1:
        raise CurvscopeError(f"--subsample must be at least 1, got {opts['subsample']}")
    if opts["top_k"] is not None and opts["top_k"] < 1:
        raise CurvscopeError(f"--top-k must be at least 1, got {opts['top_k']}")
    parsed = {"damping": parse_damping(opts["damping"]), "max_memory": parse_memory(opts["max_memory"])}
    if opts["newton_step"] is not None and not opts["directions"]:
        raise CurvscopeError("--newton-step needs the directional derivatives: leave out --no-directions")
    for key, flag in (("eigenvectors", "--eigenvectors"), ("newton_step", "--newton-step")):
        if opts[key] is not None and check_files:
            check_writable(opts[key], flag)
    return parsed


def _validate(problem, opts: dict[str, Any], out_dir: Path, check_files: bool = True) -> dict[str, Any]:
    """Check every option before the (long) computation; returns parsed values."""
    from curvscope.io.atomic import check_writable

    parsed = _validate_options(opts, check_files)
    if opts["subsample"] is not None and opts["subsample"] > problem.batch_size:
        raise CurvscopeError(f"--subsample {opts['subsample']} is larger than the batch "
                             f"({problem.batch_size} samples)")
    if check_files:
        if out_dir.exists() and not out_dir.is_dir():
            raise CurvscopeError(f"--out {out_dir}: exists and is not a directory")
        check_writable(out_dir / "report.json", "--out")
    if opts["eigenvectors"] is not None:  # k x D numbers in memory and on disk: refuse what cannot fit
        from curvscope.curvature.memory import MemoryPlan
        from curvscope.curvature.spectrum import DEFAULT_TOP_K

        columns = (opts["subsample"] or problem.batch_size) * (opts["mc_samples"] or problem.num_outputs)
        k = min(opts["top_k"] or DEFAULT_TOP_K, columns)
        size = k * problem.num_params * next(iter(problem.params.values())).element_size()
        budget = MemoryPlan.default(problem.device, parsed["max_memory"]).budget
        if size > budget:
            raise CurvscopeError(f"--eigenvectors: up to {k} eigenvectors of {problem.num_params:,} parameters "
                                 f"need {size / 2**30:.1f} GiB, more than the memory budget "
                                 f"({budget / 2**30:.1f} GiB): pass a smaller --top-k")
    return parsed


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Any]:
    """A ``progress(stage, done, total)`` callback drawing one rich progress bar per stage."""
    if quiet:
        yield lambda _stage, _done, _total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    labels = {"gram": "Gram matrix (parameter tensors)", "eigen": "eigendecomposition (groups)",
              "newton": "damped Newton step", "plots": "plots", "write": "writing files"}
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


def run_spectrum(problem, out_dir: Path, options: dict[str, Any] | None = None, quiet: bool = False,
                 process_group: ProcessGroup | None = None) -> dict[str, Any]:
    """Compute the spectrum of ``problem`` and write ``out_dir/report.json``, plots and tensor files.

    Args:
        options: the command's options in snake_case (``groups``, ``mc_samples``, ``subsample``, ``top_k``,
            ``directions``, ``eigenvectors``, ``newton_step``, ``damping``, ``max_memory``, ``ghost``, ``plots``,
            ``seed``; ``no_directions``/``no_ghost``/``no_plots`` are accepted too); missing keys take
            :data:`DEFAULTS`.
        quiet: no progress bars.
        process_group: an initialized ``torch.distributed`` group (collective: every rank passes the same
            problem and options). The computation is split over the ranks; rank 0 alone checks and writes the
            files (other ranks return the same report, without ``files``, and show no progress); a failure on
            any rank raises on every rank.
    Returns:
        The report written (a JSON-able dict; on disk it may be merged into an existing report of the same
        problem). Nothing is written when anything fails before the writing starts, and ``report.json`` is
        written last.
    """
    from curvscope.curvature import distributed
    from curvscope.curvature.newton import newton_step
    from curvscope.curvature.spectrum import compute_spectrum, eigenvectors
    from curvscope.report import spectrum_report as sr
    from curvscope.report.schema import build_report

    out_dir = Path(out_dir)
    opts = _options(options)
    comm = None if process_group is None else distributed.Comm.create(process_group, problem.device)
    primary = comm is None or comm.primary
    with distributed.stage(comm):
        parsed = _validate(problem, opts, out_dir, check_files=primary)
    seed = opts["seed"] if opts["seed"] is not None else int(problem.info.get("seed") or 0)
    groups_mode = opts["groups"]

    with _progress(quiet or not primary) as progress:
        result = compute_spectrum(
            problem, groups=groups_mode, mc_samples=opts["mc_samples"], subsample=opts["subsample"],
            top_k=opts["top_k"], directional=opts["directions"], include_total=groups_mode != "all", seed=seed,
            ghost=opts["ghost"], max_memory=parsed["max_memory"], progress=progress, process_group=process_group,
            eigenvectors=opts["eigenvectors"] is not None or opts["newton_step"] is not None)

        step = None
        if opts["newton_step"] is not None:
            progress("newton", 0, 1)
            step = newton_step(problem, result, parsed["damping"], seed=seed, process_group=process_group)
            progress("newton", 1, 1)
        vectors = (eigenvectors(problem, result, group=0, process_group=process_group)
                   if opts["eigenvectors"] is not None else None)

        with distributed.stage(comm):
            fields = sr.spectrum_fields(result, problem.batch_size, directional=opts["directions"])
            # replaces a stale section when merging into an older report of this problem
            fields["newton"] = None if step is None else sr.newton_fields(step, opts["newton_step"])
            if not primary:  # rank > 0 of a distributed run: the numbers, no files
                return build_report("spectrum", problem, {**fields, "files": {}})
            report = _write_outputs(problem, result, step, vectors, fields, opts, out_dir, progress)
    return report


def _write_outputs(problem, result, step, vectors, fields: dict[str, Any], opts: dict[str, Any], out_dir: Path,
                   progress) -> dict[str, Any]:
    """Prepare every file in memory (a failure leaves no file behind), then write them, report.json last."""
    from curvscope.report import spectrum_report as sr
    from curvscope.report.schema import build_report, write_report

    groups_mode = opts["groups"]
    files: dict[str, str] = {}
    tensor_files: list[tuple[Path, dict, dict]] = []
    directions = sr.directions_tensors(result, step) if opts["directions"] else {}
    if directions:
        path = out_dir / FILE_NAMES["directions"]
        tensor_files.append((path, directions, {"format": "curvscope.directions", "grouping": groups_mode,
                                                "groups": [g.name for g in result.groups]}))
        files["directions"] = str(path)
    if vectors is not None:
        total = result.groups[0]
        tensor_files.append((Path(opts["eigenvectors"]),
                             sr.eigenvector_tensors(vectors, total.eigenvalues[:total.top_k]),
                             {"format": "curvscope.eigenvectors", "group": total.name, "k": total.top_k,
                              "parameters": list(problem.params)}))
        files["eigenvectors"] = str(opts["eigenvectors"])
    if step is not None:
        tensor_files.append((Path(opts["newton_step"]),
                             {n: t.detach().cpu().contiguous() for n, t in step.step.items()},
                             {"format": "curvscope.newton_step", "damping": step.damping,
                              "blocks": step.blocks}))
        files["newton_step"] = str(opts["newton_step"])

    report = build_report("spectrum", problem, {**fields, "files": {}})
    pngs: list[tuple[Path, bytes]] = []
    if opts["plots"]:
        pngs = _render_plots(report, out_dir, progress)
        for path, _ in pngs:
            files[{v: k for k, v in FILE_NAMES.items()}[path.name]] = str(path)
    report["files"] = dict(sorted(files.items()))

    total_writes = len(tensor_files) + len(pngs) + 1
    progress("write", 0, total_writes)
    for i, (path, tensors, meta) in enumerate(tensor_files):
        sr.save_tensors(path, tensors, meta)
        progress("write", i + 1, total_writes)
    for j, (path, data) in enumerate(pngs):
        _write_bytes(path, data)
        progress("write", len(tensor_files) + j + 1, total_writes)
    write_report(out_dir, report)
    progress("write", total_writes, total_writes)
    return report


def _render_plots(report: dict[str, Any], out_dir: Path, progress) -> list[tuple[Path, bytes]]:
    from curvscope.report import plots

    problem, approx, groups = report["problem"], report["approximation"], report["groups"]
    jobs = [("spectrum.png", lambda: plots.spectrum_figure(groups[0], problem, approx))]
    if groups[0].get("directions"):
        jobs.append(("directions.png", lambda: plots.directions_figure(groups[0], problem, approx)))
    if report["grouping"] != "all" and len(groups) > 1:
        jobs.append(("layers.png", lambda: plots.layers_figure(groups[1:], problem, approx)))
    rendered = []
    for i, (name, make) in enumerate(jobs):
        progress("plots", i, len(jobs))
        rendered.append((out_dir / name, plots.render_png(make())))
    progress("plots", len(jobs), len(jobs))
    return rendered


def _write_bytes(path: Path, data: bytes) -> None:
    from curvscope.io.atomic import write_atomic

    try:
        write_atomic(path, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        raise CurvscopeError(f"{path}: cannot write ({exc.strerror or exc})") from exc


# -- the command ---------------------------------------------------------------------------------------------

@app.command("spectrum")
@handle_errors
def spectrum(
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
    options = {
        "groups": groups, "mc_samples": mc_samples, "subsample": subsample, "top_k": top_k,
        "directions": directions, "eigenvectors": eigenvectors, "newton_step": newton_step, "damping": damping,
        "max_memory": max_memory, "ghost": ghost, "plots": plots, "seed": seed,
    }
    from curvscope.curvature import distributed

    launch = distributed.torchrun_env()  # launched by torchrun with several processes: run distributed
    if launch is not None and not launch.primary:
        quiet_output()  # rank 0 alone prints (the summary, and the one error message all ranks agree on)
    # bad options fail before the files load (rank 0 alone checks the output paths it will write)
    _validate_options(_options(options), check_files=launch is None or launch.primary)
    if launch is None:
        problem = build_problem(checkpoint, data, model, model_kwargs, batch_size, shuffle, seed, loss, device,
                                dtype)
        report = run_spectrum(problem, out_dir, options)
    else:
        try:
            rank_device = distributed.launch_device(launch, device)
        except distributed.LocalRankError as exc:  # too few GPUs on this rank's node: only this rank can say so
            quiet_output(False)
            raise CurvscopeError(f"rank {launch.rank}: {exc}") from exc
        try:
            comm = distributed.Comm.create(distributed.init_from_env(launch, rank_device), rank_device)
            with comm.stage():  # a file missing on one node ends every rank with that message
                problem = build_problem(checkpoint, data, model, model_kwargs, batch_size, shuffle, seed, loss,
                                        str(rank_device), dtype)
            report = run_spectrum(problem, out_dir, options, quiet=not launch.primary, process_group=comm.group)
        finally:
            distributed.shutdown()
    from curvscope.report.tables import facts_table, spectrum_table

    out.print(spectrum_table(report))
    out.print(facts_table(report, str(out_dir)))
