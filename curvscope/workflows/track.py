"""``track``: curvature over training, one point per checkpoint of a run (``docs/track.md``).

:class:`TrackOptions` are the knobs. :func:`run_problem` builds the Problem once from a run's first checkpoint
(the model and the batch every point shares), :func:`problem_at` puts another checkpoint's parameters into it,
and :func:`run_track` measures every checkpoint with :func:`curvscope.curvature.track.measure_point`, warm-starting
each point from the previous one, reusing the points of a previous report whose checkpoint and options are
unchanged, and telling a listener after every point (the CLI rewrites the report then). :func:`write_track` adds
the report's ``track`` section and ``track.png`` to a :class:`~curvscope.report.writer.ReportWriter`.
Conventions: ``docs/conventions.md`` §10.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from curvscope import commands
from curvscope.errors import CurvscopeError
from curvscope.workflows.base import Workflow
from curvscope.workflows.options import OptionError, Options, at_least, one_of, option

if TYPE_CHECKING:
    from curvscope.curvature.edge import OptimizerInfo
    from curvscope.curvature.track import PointResult
    from curvscope.io.runs import RunCheckpoint, TrainingState
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter

COMMAND = commands.get("track")
PLOT_NAME = "track.png"
OPTIMIZERS = ("sgd", "adam", "adamw")
MEASURES = ("trace", "bottom", "ggn", "hessian")


@dataclass
class TrackOptions(Options):
    """Options of curvature over training (the ``curvscope track`` flags, in snake_case)."""

    command: ClassVar[str] = COMMAND.command

    curvature: str = option("hessian", "The matrix whose lambda_max is tracked: hessian (by Lanczos on "
                            "Hessian-vector products) or ggn (the generalized Gauss-Newton, PSD).")
    groups: str = option("all", "all (the whole model only), layer or tensor: also each group's block sharpness "
                         "(the largest eigenvalue of its diagonal block), drawn as a heatmap over steps.")
    measure: str = option("", "More of what spectrum computes, comma-separated: trace (Hutch++), bottom (the "
                          "Hessian's smallest eigenvalue), ggn (the GGN's lambda_max beside the Hessian's), hessian "
                          "(the Hessian's beside the GGN's).")
    lr: float | None = option(None, "Learning rate for checkpoints without optimizer state (the threshold needs "
                              "it); a checkpoint's own optimizer state always wins.")
    momentum: float = option(0.0, "SGD momentum for checkpoints without optimizer state (heavy ball).")
    optimizer: str | None = option(None, "sgd, adam or adamw: the optimizer of checkpoints without optimizer "
                                   "state (default sgd when ``lr`` is given); with state, it tells Adam from AdamW "
                                   "where the state cannot.")
    betas: str = option("0.9,0.999", "Adam's betas for checkpoints without optimizer state (beta1 sets the "
                        "threshold; the preconditioned sharpness needs the state).")
    eps: float = option(1e-8, "Adam's eps for checkpoints without optimizer state.")
    weight_decay: float = option(0.0, "Weight decay for checkpoints without optimizer state (coupled for sgd "
                                 "and adam: added to the compared sharpness; decoupled for adamw).")
    tol: float = option(1e-4, "Lanczos: converged when the residual is below tol * |lambda_max| (>= 1e-5 in "
                        "float32).")
    max_steps: int | None = option(None, "Cap on Lanczos steps per eigenvalue (default: the solver's).")
    trace_samples: int = option(30, "Products of the Hutch++ trace (``measure`` trace).")
    warm_start: bool = option(True, "Start each point's Lanczos from the previous point's top Ritz vector (the "
                              "same result to the tolerance, fewer products).")
    fresh: bool = option(False, "Recompute every point; by default the points of a previous report in the output "
                         "directory whose checkpoint and options are unchanged are reused.")
    plot: bool = option(True, "Write track.png: sharpness against step with the threshold, loss and gradient "
                        "norm, and the per-group heatmap with ``groups`` layer/tensor.")

    def validate(self) -> None:
        """Check every value that needs no Problem."""
        from curvscope.problem import GROUP_MODES

        super().validate()
        one_of("curvature", self.curvature, ("hessian", "ggn"))
        one_of("groups", self.groups, GROUP_MODES)
        self.measures()
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise OptionError("lr", f"must be a finite number >= 0, got {self.lr}")
        if not (0 <= self.momentum < 1):
            raise OptionError("momentum", f"must lie in [0, 1), got {self.momentum}")
        if self.optimizer is not None:
            one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.momentum and self.optimizer in ("adam", "adamw"):
            raise OptionError("momentum", lambda name: f"applies to sgd, not {name('optimizer', self.optimizer)}")
        self.parsed_betas()
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise OptionError("eps", f"must be a finite number >= 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise OptionError("weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        if not (0 < self.tol < 1):
            raise OptionError("tol", f"must lie in (0, 1), got {self.tol}")
        at_least("max_steps", self.max_steps, 1, optional=True)
        at_least("trace_samples", self.trace_samples, 1)

    def measures(self) -> tuple[str, ...]:
        """``measure`` as a tuple of names (checked)."""
        names = tuple(m.strip() for m in self.measure.split(",") if m.strip())
        for m in names:
            one_of("measure", m, MEASURES)
        return names

    def parsed_betas(self) -> tuple[float, float]:
        """``betas`` as two numbers in [0, 1)."""
        try:
            values = tuple(float(b) for b in self.betas.split(","))
        except ValueError:
            values = ()
        if len(values) != 2 or not all(0 <= b < 1 for b in values):
            raise OptionError("betas", f"'{self.betas}': expected two numbers in [0, 1), e.g. 0.9,0.999")
        return values  # type: ignore[return-value]

    def settings(self, problem: Problem) -> dict[str, Any]:
        """What a point's numbers depend on besides its checkpoint: a point of a previous report is reused only
        when these are equal (``warm_start``, ``fresh`` and ``plot`` do not change the numbers)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("warm_start", "fresh", "plot")}
        values["measure"] = list(self.measures())
        problem_keys = ("model", "model_kwargs", "data", "batch_indices", "seed")
        return {**values, **{k: problem.info.get(k) for k in problem_keys}, "loss": problem.loss.name,
                "dtype": str(problem.dtype).replace("torch.", ""), "device": str(problem.device)}

    def manual_optimizer(self) -> OptimizerInfo | None:
        """The optimizer of a checkpoint without optimizer state, as the options describe it (``None`` without
        ``lr`` and ``optimizer``)."""
        from curvscope.curvature.edge import OptimizerInfo

        if self.lr is None and self.optimizer is None:
            return None
        kind = self.optimizer or "sgd"
        adam = kind in ("adam", "adamw")
        return OptimizerInfo(kind, lr=self.lr, momentum=0.0 if adam else self.momentum,
                             weight_decay=self.weight_decay, betas=self.parsed_betas() if adam else None,
                             eps=self.eps if adam else None)


@dataclass(repr=False)
class TrackPoint:
    """One checkpoint of the run: where it is, and its measurements (or the previous report's, reused).

    Attributes:
        step: the training step.
        checkpoint: its path (``None`` for a point of :class:`curvscope.Monitor`).
        fingerprint: ``{"size", "sha256"}`` of its files (``None`` for the monitor).
        seconds: wall time of the measurement (of the original one when reused).
        reused: taken from the previous report unchanged.
        measured: the measurements (``None`` when reused).
        previous: the previous report's point (when reused).
        notes: what the workflow adds (the optimizer's source).
    """

    step: int
    checkpoint: str | None
    fingerprint: dict[str, Any] | None
    seconds: float
    reused: bool = False
    measured: PointResult | None = None
    previous: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"TrackPoint(step={self.step}, reused={self.reused}, measured={self.measured!r})"


@dataclass(repr=False)
class TrackRun:
    """What :func:`run_track` returns (and hands to its listener after every point, growing).

    Attributes:
        run: the run as given (directories, files, globs).
        total: the number of checkpoints in the run.
        points: the points measured or reused so far, in step order.
        options: the options of the run.
        settings: :meth:`TrackOptions.settings` (the key of reuse).
        group_names: the parameter groups of the block sharpness (with ``groups``), in order.
        notes: notes of the whole run.
    """

    run: list[str]
    total: int
    points: list[TrackPoint]
    options: TrackOptions
    settings: dict[str, Any]
    group_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every checkpoint has its point."""
        return len(self.points) == self.total

    def __repr__(self) -> str:
        return f"TrackRun(points={len(self.points)}/{self.total}, run={self.run!r})"


Listener = Callable[[TrackRun, "RunCheckpoint | None"], None]
"""``listener(run, next_checkpoint)``: called before each checkpoint (``next_checkpoint`` is it) and after the
last point (``None``); the run holds the points finished so far."""


# -- the problem: built once, its parameters replaced per checkpoint ---------------------------------------

def run_problem(first: RunCheckpoint, state: TrainingState, **load: Any) -> Problem:
    """The Problem of a run: the model built once from its first checkpoint (``load["model"]`` or the
    checkpoint's self-describing metadata; a Hugging Face directory names its own), the batch every point shares.

    Args:
        first: the run's first checkpoint.
        state: it, loaded.
        **load: :func:`curvscope.io.load.load_problem`'s keyword arguments but ``checkpoint``.
    """
    from curvscope.io.checkpoints import checkpoint_from_state
    from curvscope.io.load import load_problem

    if first.kind == "hf":
        return load_problem(checkpoint=first.path, **load)
    checkpoint = checkpoint_from_state(first.path, state.state_dict, state.metadata)
    return load_problem(checkpoint=checkpoint, **load)


def problem_at(problem: Problem, state_dict: Mapping[str, Any], source: str, first: str = "the first checkpoint"
               ) -> Problem:
    """``problem`` with the parameters (and buffers) of ``state_dict``: the same model, batch and loss.

    Raises:
        CurvscopeError: a parameter missing, of another shape, or tensors the model does not have: checkpoints
            of different models (one line naming the tensor and both shapes).
    """
    known = set(problem.params) | set(problem.buffers) | set(problem.model.state_dict())
    unexpected = sorted(k for k in state_dict if k not in known)
    if unexpected:
        raise CurvscopeError(f"{source}: holds '{unexpected[0]}', which the model of {first} does not have: "
                             "checkpoints of different models")

    def take(name: str, like: Any) -> Any:
        value = state_dict[name]
        if tuple(value.shape) != tuple(like.shape):
            raise CurvscopeError(f"{source}: '{name}' has shape {tuple(value.shape)}, {first} has "
                                 f"{tuple(like.shape)}: checkpoints of different models")
        dtype = problem.dtype if value.is_floating_point() else value.dtype
        return value.detach().to(device=problem.device, dtype=dtype)

    missing = [n for n in problem.params if n not in state_dict]
    if missing:
        raise CurvscopeError(f"{source}: has no '{missing[0]}', which {first} has: checkpoints of different models")
    params = {n: take(n, p) for n, p in problem.params.items()}
    buffers = {n: take(n, b) if n in state_dict else b for n, b in problem.buffers.items()}
    return dataclasses.replace(problem, params=params, buffers=buffers)


def check_shapes(problem: Problem, checkpoints: Sequence[RunCheckpoint], options: TrackOptions | None = None,
                 loaded: Mapping[Path, TrainingState] | None = None) -> None:
    """Every checkpoint holds the problem's parameters with their shapes, and (with ``options``) its optimizer
    state matches them in ``named_parameters()`` order: read from the files' headers (a ``.pt`` file
    memory-mapped, :meth:`~curvscope.io.runs.RunCheckpoint.outline`) before any computation.

    Args:
        problem: the run's Problem.
        checkpoints: the run's checkpoints.
        options: the run's options (the optimizer kind given); ``None``: the optimizer states are not checked.
        loaded: checkpoints already loaded, by path (their own optimizer state is checked).

    Raises:
        CurvscopeError: one line naming the first checkpoint of another model, the tensor and both shapes; or the
            first checkpoint whose optimizer state does not match the model.
    """
    first = f"the first checkpoint ({checkpoints[0].path})" if checkpoints else "the model"
    for index, checkpoint in enumerate(checkpoints):
        state = (loaded or {}).get(checkpoint.path)
        outline = checkpoint.outline() if state is None or index else None
        shapes = outline.shapes if index else {}
        for name, p in problem.params.items() if index else ():
            if name not in shapes:
                raise CurvscopeError(f"{checkpoint.path}: has no '{name}', which {first} has: checkpoints of "
                                     "different models")
            if shapes[name] != tuple(p.shape):
                raise CurvscopeError(f"{checkpoint.path}: '{name}' has shape {shapes[name]}, {first} has "
                                     f"{tuple(p.shape)}: checkpoints of different models")
        optimizer_state = state.optimizer_state if state is not None else outline.optimizer_state
        if options is not None and optimizer_state is not None:
            point_optimizer(problem, optimizer_state, options, str(checkpoint.path))


def point_optimizer(problem: Problem, optimizer_state: Mapping[str, Any] | None, options: TrackOptions,
                    source: str) -> tuple[OptimizerInfo | None, list[str]]:
    """The optimizer of a point: from its state dict (matched to the model's parameters), else the options."""
    from curvscope.curvature.edge import optimizer_info

    if optimizer_state is None:
        info = options.manual_optimizer()
        note = ("optimizer as given (no optimizer state in the checkpoint): the preconditioned sharpness needs the "
                "state" if info is not None and info.kind in ("adam", "adamw") else
                "optimizer as given (no optimizer state in the checkpoint)" if info is not None else None)
        return info, [note] if note else []
    names = list(problem.params)
    shapes = {n: p.shape for n, p in problem.params.items()}
    try:
        info = optimizer_info(optimizer_state, names, shapes, kind_hint=options.optimizer)
    except OptionError:
        raise
    except CurvscopeError as exc:
        raise CurvscopeError(f"{source}: {exc}") from None
    notes = ["optimizer from the checkpoint's optimizer state"]
    if options.lr is not None:
        notes.append("the optimizer state's lr is used (the lr given applies to checkpoints without state)")
    return info, notes


# -- the run ------------------------------------------------------------------------------------------------

def reusable(previous: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The points of a previous report's ``track`` section that may be reused, by step: those of the same
    settings (their checkpoints' fingerprints are compared per point)."""
    section = (previous or {}).get("track") or {}
    if not isinstance(section, dict) or section.get("settings") != _plain(settings):
        return {}
    points = section.get("points") or []
    return {int(p["step"]): p for p in points if isinstance(p, dict) and isinstance(p.get("step"), int)
            and isinstance(p.get("fingerprint"), dict)}


def _plain(settings: Mapping[str, Any]) -> Any:
    from curvscope.report.schema import to_jsonable

    return to_jsonable(dict(settings))


def run_track(problem: Problem, options: TrackOptions | None = None, progress: Progress | None = None, *,
              checkpoints: Sequence[RunCheckpoint] | None = None, run: Sequence[str] | None = None,
              previous: Mapping[str, Any] | None = None, loaded: Mapping[Path, TrainingState] | None = None,
              listener: Listener | None = None) -> TrackRun:
    """Measure every checkpoint of a run on ``problem``'s model and batch.

    Args:
        problem: the Problem of the run (:func:`run_problem`), at any parameters.
        options: the knobs (default :class:`TrackOptions`); validated first.
        progress: ``progress(stage, done, total)`` of the eigen-solves (``"lanczos"``, ``"trace"``).
        checkpoints: the run's checkpoints in step order (:func:`curvscope.io.runs.find_checkpoints`);
            ``None``: the problem's own parameters as one point of step 0 (what ``curvscope check`` computes
            from a single checkpoint).
        run: the run as given (for the report).
        previous: a previous report (its points are reused where the checkpoint and settings are unchanged,
            unless ``options.fresh``).
        loaded: checkpoints already loaded, by path (the first one, loaded to build the problem).
        listener: called before each checkpoint and after the last (see :data:`Listener`).

    Raises:
        CurvscopeError: a checkpoint of another model, or optimizer state that does not match the model.
    """
    from curvscope.curvature.track import measure_point

    options = TrackOptions() if options is None else options
    options.validate()
    settings = options.settings(problem)
    old = {} if options.fresh else reusable(previous, settings)
    group_names = [g.name for g in problem.groups(options.groups)] if options.groups != "all" else []
    items = list(checkpoints) if checkpoints is not None else [None]
    result = TrackRun(run=[str(r) for r in (run or [problem.info.get("checkpoint") or "parameters"])],
                      total=len(items), points=[], options=options, settings=settings, group_names=group_names)
    if checkpoints is not None:
        check_shapes(problem, checkpoints, options, loaded)
    first = f"the first checkpoint ({items[0].path})" if items[0] is not None else "the model"
    vectors, last = None, None
    seed = int(problem.info.get("seed") or 0)
    for checkpoint in items:
        if listener is not None:
            listener(result, checkpoint)
        fingerprint = None
        if checkpoint is not None:
            full = checkpoint.fingerprint()
            fingerprint = {"size": full["size"], "sha256": full["sha256"]}
            kept = old.get(checkpoint.step)
            if kept is not None and kept.get("checkpoint") == str(checkpoint.path) and \
                    kept.get("fingerprint") == fingerprint:
                result.points.append(TrackPoint(step=checkpoint.step, checkpoint=str(checkpoint.path),
                                                fingerprint=fingerprint, seconds=float(kept.get("seconds") or 0.0),
                                                reused=True, previous=kept))
                continue
        started = time.perf_counter()
        if checkpoint is None:
            at, state_opt, step, source = problem, None, 0, str(problem.info.get("checkpoint") or "the model")
        else:
            state = (loaded or {}).get(checkpoint.path) or checkpoint.load()
            source, step = str(checkpoint.path), checkpoint.step
            at, state_opt = problem_at(problem, state.state_dict, source, first), state.optimizer_state
        info, notes = point_optimizer(at, state_opt, options, source)
        measured = measure_point(at, info, state_opt, curvature=options.curvature, groups=options.groups,
                                 measures=options.measures(), tol=options.tol, max_steps=options.max_steps,
                                 trace_samples=options.trace_samples, seed=seed,
                                 start=vectors if options.warm_start else None, progress=progress)
        if last is not None:
            last.vectors = {}  # one set of D-sized vectors held: the newest point's
        vectors, last = measured.vectors, measured
        result.points.append(TrackPoint(step=step, checkpoint=source if checkpoint is not None else
                                        problem.info.get("checkpoint"),
                                        fingerprint=fingerprint, seconds=time.perf_counter() - started,
                                        measured=measured, notes=notes))
    if listener is not None:
        listener(result, None)
    return result


def write_track(writer: ReportWriter, problem: Problem, result: TrackRun, options: TrackOptions) -> None:
    """Add the report's ``track`` section of ``result`` (and ``track.png`` when ``options.plot``) to ``writer``."""
    from curvscope.report.track_report import track_section

    section = track_section(result)
    if options.plot and result.points:
        from curvscope.report.track_plots import track_figure

        section["plot"] = str(writer.plot("track_plot", PLOT_NAME, lambda r: track_figure(r["track"], r["problem"])))
        section["plot_points"] = len(section["points"])
    writer.section(COMMAND.command, {COMMAND.key: section})


WORKFLOW = Workflow(COMMAND.name, options=TrackOptions, run=run_track, write=write_track, claim=None)
