"""``curvscope track``: flags -> :class:`~curvscope.workflows.track.TrackOptions` -> one point per checkpoint, the
report rewritten after every point.

The computation is :func:`curvscope.workflows.track.run_track`; the section, table and figure are made by
:mod:`curvscope.report.track_report` and :mod:`curvscope.report.track_plots`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from curvscope.cli import signals
from curvscope.cli.common import console, handle_errors, one_line_paragraphs, out, warn
from curvscope.cli.options import DEFAULT_OUT, DebugOpt, ProblemArgs, flag, problem_options, workflow_options
from curvscope.cli.root import app
from curvscope.workflows.track import TrackOptions

TRACK_HELP = "Curvature"
OPTIMIZER_HELP = "Optimizer (checkpoints without optimizer state)"
RUN_HELP = "Run"
OUTPUT_HELP = "Output"

HELP = """Curvature over training: the sharpness of every checkpoint of a run against the optimizer's threshold.

RUN is a directory of checkpoints (.safetensors, .pt/.pth training checkpoints with the model state under
model/state_dict/model_state_dict and optionally optimizer/optimizer_state_dict and step/global_step, or Hugging
Face Trainer checkpoint-<n>/ directories), or checkpoint files and globs. Checkpoints are ordered by step (their
own step/global_step, else the last integer in the name; step_100 comes after step_20).

Per checkpoint, on the same batch: the loss, the gradient norm, lambda_max of the Hessian by Lanczos (--curvature
ggn: of the GGN), the optimizer and learning rate (from the checkpoint's optimizer state, else --lr, --momentum,
--optimizer), the stability threshold (2/lr for SGD, (2 + 2 momentum)/lr with heavy-ball momentum, 38/lr for
Adam at beta1 = 0.9, compared with the preconditioned sharpness lambda_max(P^-1 H) from the state), and the
sharpness ratio (1 is the edge of stability). --groups layer adds each layer's block sharpness; --measure
trace,bottom,ggn more of what spectrum computes. Each point's Lanczos starts from the previous point's top Ritz
vector (--no-warm-start: random starts).

The model is built once from the first checkpoint (self-describing metadata, or --model SPEC). DIR/report.json
(section track) is rewritten atomically after every point, DIR/track.png at the end (and at most once a minute
while the run goes on): Ctrl-C or SIGTERM keeps every complete point in both. Run again on the same --out to
reuse the points whose checkpoint and options are unchanged (--fresh recomputes all).

Example: [bold]curvscope track sample_models/eos-run --data sample_models/digits.safetensors --batch-size 256[/bold]
"""

OPTIONS = (
    flag("curvature", panel=TRACK_HELP),
    flag("groups", "--groups", "-g", panel=TRACK_HELP),
    flag("measure", panel=TRACK_HELP),
    flag("tol", panel=TRACK_HELP),
    flag("max_steps", panel=TRACK_HELP),
    flag("trace_samples", panel=TRACK_HELP),
    flag("warm_start", "--warm-start/--no-warm-start", panel=TRACK_HELP),
    flag("lr", panel=OPTIMIZER_HELP),
    flag("momentum", panel=OPTIMIZER_HELP),
    flag("optimizer", panel=OPTIMIZER_HELP),
    flag("betas", panel=OPTIMIZER_HELP),
    flag("eps", panel=OPTIMIZER_HELP),
    flag("weight_decay", panel=OPTIMIZER_HELP),
    flag("fresh", "--fresh/--no-fresh", panel=OUTPUT_HELP),
    "out_dir",
    flag("plot", "--plot/--no-plot", panel=OUTPUT_HELP),
)
"""The flags of :class:`~curvscope.workflows.track.TrackOptions` (defaults and help: its fields)."""


@contextlib.contextmanager
def _checkpoint_bar(total: int) -> Iterator[Any]:
    """One bar over the checkpoints (the current step, elapsed time and an ETA) whose label also follows the
    current eigen-solve; transient."""
    if console.quiet:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(SpinnerColumn(), TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
    bar.start()
    try:
        bar.task = bar.add_task("checkpoints", total=max(total, 1))  # type: ignore[attr-defined]
        yield bar
    finally:
        bar.stop()


@app.command("track", help=one_line_paragraphs(HELP))
@handle_errors
@problem_options(checkpoint=False)
@workflow_options(TrackOptions, OPTIONS)
def track(
    args: ProblemArgs,
    options: TrackOptions,
    run: Annotated[list[Path], typer.Argument(
        help="The run: a directory of checkpoints, checkpoint files, Hugging Face checkpoint-<n>/ directories, "
        "or globs of them (quote globs).", show_default=False, metavar="RUN...")],
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json (section 'track'), rewritten after every point, and "
        "track.png, drawn at the end (and at most once a minute while running).",
        rich_help_panel=OUTPUT_HELP)] = DEFAULT_OUT,
    debug: DebugOpt = False,
) -> None:
    """Curvature over training (help text: :data:`HELP`)."""
    from curvscope.io.atomic import check_directory
    from curvscope.io.runs import find_checkpoints
    from curvscope.report.schema import REPORT_NAME, existing_report
    from curvscope.report.track_live import TrackWriter
    from curvscope.report.track_report import groups_table, notes, track_table
    from curvscope.workflows.track import run_track

    options.validate()  # bad options fail before the files load
    check_directory(out_dir, "out_dir")
    previous = existing_report(Path(out_dir) / REPORT_NAME)
    with console.status("Finding checkpoints..."):
        checkpoints = find_checkpoints(run)
        first = checkpoints[0].load()
    load = {k: v for k, v in vars(args).items() if k != "checkpoint"}
    problem = _load(checkpoints[0], first, load)
    label = " ".join(str(r) for r in run)
    problem.info["checkpoint"] = label
    writer = TrackWriter(out_dir, problem, plot=options.plot, warn=warn)
    written: dict[str, Any] = {"report": None, "seen": 0, "run": None}

    with _checkpoint_bar(len(checkpoints)) as bar:
        def listener(result, upcoming) -> None:
            written["run"] = result
            if upcoming is None:
                written["report"] = writer.finish(result)
            elif any(not p.reused for p in result.points[written["seen"]:]):
                writer.update(result)  # compact, the figure at most once a minute: finish() completes both
            written["seen"] = len(result.points)
            if bar is not None:
                label = f"step {upcoming.step}" if upcoming is not None else "done"
                bar.update(bar.task, completed=len(result.points), description=label)

        def progress(stage: str, done: int, total: int | None) -> None:
            if bar is not None and total:
                step = bar.tasks[0].description.split(" · ")[0]
                bar.update(bar.task, description=f"{step} · {stage} {done}")

        try:
            result = run_track(problem, options, progress, checkpoints=checkpoints, run=[str(r) for r in run],
                               previous=previous, loaded={checkpoints[0].path: first}, listener=listener)
        except KeyboardInterrupt as exc:
            _interrupted(exc, out_dir, writer, written["run"], len(checkpoints))
    report = written["report"]
    section = report["track"]
    out.print(track_table(section))
    table = groups_table(section)
    if table is not None:
        out.print(table)
    for line in notes(section):
        out.print(escape(line))
    plot_path = report["files"].get("track_plot")
    shown = f"report: {Path(out_dir) / REPORT_NAME}" + (f", plot: {plot_path}" if plot_path else "")
    out.print(escape(shown), soft_wrap=True)
    del result


def _load(checkpoint, state, load: dict[str, Any]):
    """The run's Problem, built from its first checkpoint under the CLI's spinner."""
    from curvscope.workflows.track import run_problem

    with console.status("Loading model and data..."):
        return run_problem(checkpoint, state, **load)


def _interrupted(exc: KeyboardInterrupt, out_dir: Path, writer, run, total: int) -> None:
    """Ctrl-C (exit 130) or SIGTERM (exit 143): the report, written in full now, keeps every complete point (a
    failure here leaves the last report written after a point, which is complete and consistent too)."""
    signals.ignore()
    points = 0
    if run is not None and any(not p.reused for p in run.points):
        try:
            writer.finish(run)
            points = len(run.points)
        except Exception:  # noqa: BLE001 - the report written after the last point stays, complete and consistent
            points = len(((writer.report or {}).get("track") or {}).get("points") or [])
    code = 143 if isinstance(exc, signals.Terminated) else 130
    what = "terminated (SIGTERM)" if code == 143 else "interrupted"
    kept = (f"{Path(out_dir) / 'report.json'} keeps the {points} complete point(s) of {total}; run the same command "
            "again to finish (they are reused)") if points else "no new point was complete: the output directory is " \
        "unchanged"
    console.print(f"[bold red]{what}[/bold red]: {escape(kept)}", soft_wrap=True)
    signals.report(code, "")  # said: main() adds no second line
    raise typer.Exit(code)
