"""``lr-suggest``: per-group learning rates from the reduced Hessian, on one or several batches.

:class:`LrOptions` are the knobs, :func:`run_lr` draws the further batches and the holdout from the dataset and
runs the engine (:func:`curvscope.curvature.lr.analyse_batch`) on each batch, and :func:`write_lr` adds the
report's ``lr`` section and ``lr.png`` to a :class:`~curvscope.report.writer.ReportWriter`. :func:`suggest_lr`
is the same computation with keyword arguments (the Python API). Conventions: ``docs/conventions.md §6``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from curvscope import commands
from curvscope.workflows.base import Workflow
from curvscope.workflows.options import OptionError, Options, at_least, at_most, one_of, option

if TYPE_CHECKING:
    from curvscope.curvature.lr import LRResult
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter

COMMAND = commands.get("lr")
PLOT_NAME = "lr.png"


@dataclass
class LrOptions(Options):
    """Options of the learning-rate computation (the ``curvscope lr-suggest`` flags, in snake_case)."""

    command: ClassVar[str] = COMMAND.command

    partition: str = option("layer", "Parameter groups, one rate each: layer (one per module with parameters), "
                            "tensor (one per parameter tensor) or all (a single rate).")
    direction: str = option("gradient", "Step direction u: gradient (plain SGD) or symo (the SymO direction of the "
                            "factors engine).")
    curvature: str = option("hessian", "H in H-bar = u_s^T H u_t: hessian (as in the paper; may be indefinite) or "
                            "ggn (generalized Gauss-Newton, always PSD).")
    ridge: float = option(0.0, "Added to H-bar's diagonal for the joint Newton rates (H-bar + ridge I)^-1 g-hat "
                          "(>= 0).")
    batches: int = option(1, "Repeat on B disjoint batches of ``batch_size`` (the batch, then the next samples in "
                          "the same order) and report each rate's mean and std; a rate whose std exceeds its mean "
                          "is flagged. At most 1000.")
    holdout: int = option(0, "Also measure each step's realized loss decrease on N other samples (after the "
                          "batches).")
    cubic: bool = option(False, "Also compute the order-3 diagonal d3_s = d^3 L/d eta_s^3 and the rates minimizing "
                         "the cubic-regularized model -eta.g + eta.H.eta/2 + w/6 sum |d3_s| |eta_s|^3.")
    cubic_weight: float = option(1.0, "Weight w of the cubic term (> 0).")
    stability: bool = option(True, "Compute the stability bounds (one GGN spectrum pass per batch); without them "
                             "the rule has no caps.")
    plot: bool = option(True, "Write lr.png: rates per group on a log axis and H-bar as a correlation heatmap.")

    def validate(self) -> None:
        """Check every value that needs no Problem."""
        from curvscope.curvature.lr import DIRECTIONS, PARTITIONS
        from curvscope.problem import CURVATURES

        super().validate()
        one_of("partition", self.partition, PARTITIONS)
        one_of("direction", self.direction, DIRECTIONS)
        one_of("curvature", self.curvature, sorted(CURVATURES, key=lambda c: c != "hessian"))  # the default first
        _finite("ridge", self.ridge, 0.0)
        _finite("cubic_weight", self.cubic_weight, 0.0, strict=True)
        at_least("batches", self.batches, 1)
        at_least("holdout", self.holdout, 0)
        at_most("batches", self.batches, MAX_BATCHES, "each batch is a full computation")


MAX_BATCHES = 1_000
"""The most batches ``batches`` may repeat the computation on (docs/lr.md)."""


def _finite(name: str, value: float, low: float, strict: bool = False) -> None:
    """``value`` is a finite number ``>= low`` (``> low`` when ``strict``)."""
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise OptionError(name, f"must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


def draw_batches(problem: Problem, batches: int, holdout: int) -> tuple[list[Problem], Problem | None]:
    """Further batches and a holdout from the problem's dataset.

    Samples are taken in the order the batch was drawn (file order, or the shuffled order of the problem's
    seed), skipping the problem's own batch (:func:`curvscope.io.sources.batch_indices`, the rule every command's
    ``batches`` follows).

    Args:
        problem: a problem loaded from data (``problem.dataset`` and ``info["batch_indices"]``).
        batches: the number of batches in all, the problem's own included (>= 1).
        holdout: the number of holdout samples (>= 0).

    Returns:
        ``batches - 1`` further batches of the problem's batch size, disjoint from the problem's batch and from
        each other, and a holdout of ``holdout`` samples disjoint from all of them (None when 0).

    Raises:
        OptionError: the problem has no dataset, or the dataset is too small.
    """
    from curvscope.io.sources import batch_indices

    others, held = batch_indices(problem, batches, holdout)
    return ([problem.batch_from_dataset(idx) for idx in others],
            problem.batch_from_dataset(held) if held is not None else None)


def run_lr(problem: Problem, options: LrOptions | None = None, progress: Progress | None = None) -> LRResult:
    """Per-group learning rates on the problem's batch and ``options.batches - 1`` further disjoint batches.

    Every rate set is checked by the realized loss change on its batch (and on a holdout of
    ``options.holdout`` other samples when > 0).

    Args:
        problem: the model, batch and loss (loaded from data for ``batches > 1`` or ``holdout > 0``).
        options: the knobs (default :class:`LrOptions`); validated first.
        progress: ``progress(stage, done, total)`` (:mod:`curvscope.progress`) of stage ``"lr"``: done of
            ``batches x`` the steps of one batch.

    Returns:
        The rates of every batch, the problem's own first.

    Raises:
        OptionError: a bad option, or more samples asked for than the dataset has.
    """
    from curvscope.curvature.finite import check_finite, check_outputs
    from curvscope.curvature.lr import LRResult, analyse_batch

    options = LrOptions() if options is None else options
    options.validate()
    check_outputs(problem)
    groups = problem.groups(options.partition)
    others, held = draw_batches(problem, options.batches, options.holdout)
    results = []
    for b, batch_problem in enumerate([problem, *others]):
        def report(stage: str, done: int, total: int | None, b: int = b) -> None:
            if progress is not None:
                progress(stage, None if total is None else b * total + done,
                         None if total is None else options.batches * total)

        if b:
            check_outputs(batch_problem)
        results.append(analyse_batch(batch_problem, groups, options.partition, options.curvature,
                                     options.direction, options.ridge, options.cubic, options.cubic_weight,
                                     options.stability, held, report))
        check_finite(f"the reduced curvature of batch {b + 1}", g_hat=results[-1].g_hat, h_bar=results[-1].h_bar)
    return LRResult(partition=options.partition, curvature=options.curvature, direction=options.direction,
                    ridge=options.ridge, groups=groups,
                    num_params=[sum(problem.params[n].numel() for n in g.param_names) for g in groups],
                    batches=results, holdout_size=options.holdout if held is not None else 0,
                    cubic_weight=options.cubic_weight if options.cubic else None, path=problem.path)


def suggest_lr(problem: Problem, partition: str = LrOptions.partition, curvature: str = LrOptions.curvature,
               direction: str = LrOptions.direction, ridge: float = LrOptions.ridge, batches: int = LrOptions.batches,
               holdout: int = LrOptions.holdout, cubic: bool = LrOptions.cubic,
               cubic_weight: float = LrOptions.cubic_weight, stability: bool = LrOptions.stability,
               progress: Progress | None = None) -> LRResult:
    """Per-group learning rates (``docs/conventions.md §6``), each rate set checked by the realized loss change.

    The Python API of ``curvscope lr-suggest`` (without the files): :func:`run_lr` with these
    :class:`LrOptions`.

    Args:
        problem: the model, batch and loss.
        partition: ``layer`` (one group per module with parameters), ``tensor`` or ``all``.
        curvature: ``hessian`` (S Hessian-vector products) or ``ggn`` (S Jacobian-vector products; PSD).
        direction: ``gradient`` or ``symo``.
        ridge: added to ``H_bar``'s diagonal for the joint Newton rates (>= 0).
        batches: the problem's batch and ``batches - 1`` further disjoint batches of its dataset.
        holdout: measure each step's realized decrease on this many other samples too.
        cubic: also compute the order-3 diagonal and the cubic-regularized rates (weight ``cubic_weight``).
        cubic_weight: the weight of the cubic term (> 0).
        stability: compute the stability bounds (one GGN spectrum pass per batch); without them the recommended
            rule has no cap.
        progress: ``progress(stage, done, total)`` (see :mod:`curvscope.progress`).

    Returns:
        An :class:`~curvscope.curvature.lr.LRResult`: ``result.main.recommended``, ``.rules``, ``.steps``;
        ``result.statistics()`` over the batches.
    """
    options = LrOptions(partition=partition, direction=direction, curvature=curvature, ridge=ridge,
                        batches=batches, holdout=holdout, cubic=cubic, cubic_weight=cubic_weight,
                        stability=stability, plot=False)
    return run_lr(problem, options, progress)


def write_lr(writer: ReportWriter, problem: Problem, result: LRResult, options: LrOptions) -> None:
    """Add the report's ``lr`` section of ``result`` (and ``lr.png`` when ``options.plot``) to ``writer``."""
    from curvscope.report.lr_report import lr_section

    section = lr_section(result)
    if options.plot:
        from curvscope.report.lr_plots import lr_figure

        section["plot"] = str(writer.plot("lr_plot", PLOT_NAME, lambda r: lr_figure(r["lr"], r["problem"])))
    writer.section(COMMAND.command, {COMMAND.key: section})


WORKFLOW = Workflow(COMMAND.name, options=LrOptions, run=run_lr, write=write_lr, claim=None)
