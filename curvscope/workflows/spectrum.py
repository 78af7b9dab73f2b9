"""``spectrum``: the exact GGN eigenspectrum of a batch, directional derivatives, a damped Newton step.

:class:`SpectrumOptions` are the knobs, :func:`run_spectrum` computes (collectively under
``torch.distributed`` when given a process group) and :func:`write_spectrum` adds the report fields, plots and
tensor files to a :class:`~curvscope.report.writer.ReportWriter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from curvscope.errors import CurvscopeError
from curvscope.workflows.base import Workflow
from curvscope.workflows.options import OptionError, Options, at_least, engine_check, one_of

if TYPE_CHECKING:
    from torch import Tensor
    from torch.distributed import ProcessGroup

    from curvscope.curvature.newton import NewtonStep
    from curvscope.curvature.spectrum import SpectrumResult
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter

GROUP_MODES = ("all", "layer", "tensor")
MIN_MEMORY = 64 * 2**20
"""The smallest memory budget accepted."""
FILE_NAMES = {"directions": "directions.safetensors"}


@dataclass
class SpectrumOptions(Options):
    """Options of the spectrum computation (the ``curvscope spectrum`` flags, in snake_case)."""

    command: ClassVar[str] = "spectrum"

    groups: str = "all"
    """``all`` (the full GGN), ``layer`` or ``tensor`` (block-diagonal; the whole model comes first)."""
    mc_samples: int = 0
    """0: exact loss-Hessian square root; M > 0: Monte-Carlo with M columns per sample."""
    subsample: int | None = None
    """Curvature from the first K samples only."""
    top_k: int | None = None
    """Directional quantities for the top K nonzero directions (default: all, at most 1000)."""
    directions: bool = True
    """Per-sample directional derivatives, their SNRs and gradient overlaps."""
    eigenvectors: Path | None = None
    """Write the top-k whole-model eigenvectors to this safetensors file."""
    newton_step: Path | None = None
    """Write the damped Newton step to this safetensors file."""
    damping: str | float = "bootstrap"
    """A constant damping >= 0, or ``bootstrap``."""
    max_memory: str | int = "auto"
    """Memory budget (``4GiB``, bytes, or ``auto``)."""
    ghost: bool = True
    """Fast per-layer Gram rules where cheaper."""
    plots: bool = True
    """Draw spectrum.png, directions.png, layers.png."""
    seed: int | None = None
    """Seed of Monte-Carlo sampling and the bootstrap (None: the problem's seed, else 0)."""

    def validate(self) -> None:
        """Check every value that needs no Problem."""
        super().validate()
        one_of("groups", self.groups, GROUP_MODES)
        if self.mc_samples is None or self.mc_samples < 0:
            raise OptionError("mc_samples", f"must be 0 (exact) or positive, got {self.mc_samples}")
        at_least("mc_samples", self.mc_samples, 0)
        at_least("subsample", self.subsample, 1, optional=True)
        at_least("top_k", self.top_k, 1, optional=True)
        self.parsed_damping()
        self.parsed_memory()
        if self.newton_step is not None and not self.directions:
            raise OptionError("newton_step", "needs the directional derivatives: set directions=True",
                              "needs the directional derivatives: leave out --no-directions")

    def parsed_damping(self) -> float | str:
        """The damping as the engine takes it."""
        from curvscope.curvature.newton import parse_damping

        return engine_check("damping", parse_damping, self.damping)

    def parsed_memory(self) -> int | None:
        """The memory budget in bytes (``None``: the default); at least :data:`MIN_MEMORY`."""
        from curvscope.curvature.memory import parse_memory

        budget = engine_check("max_memory", parse_memory, self.max_memory)
        if budget is not None and budget < MIN_MEMORY:
            raise OptionError("max_memory", f"'{self.max_memory}' is below the floor of {MIN_MEMORY // 2**20} MiB "
                              "(smaller budgets only make the computation crawl)")
        return budget

    def check_problem(self, problem: Problem) -> None:
        """Checks that need the Problem (before the long computation)."""
        if self.subsample is not None and self.subsample > problem.batch_size:
            raise OptionError("subsample", f"{self.subsample} is larger than the batch ({problem.batch_size} "
                              "samples)")
        from curvscope.curvature.memory import MemoryPlan

        columns = (self.subsample or problem.batch_size) * (self.mc_samples or problem.num_outputs)
        budget = MemoryPlan.default(problem.device, self.parsed_memory()).budget
        if 8 * columns**2 > budget:  # the float64 Gram alone
            raise OptionError("mc_samples" if self.mc_samples else "max_memory",
                              f"{self.mc_samples or self.max_memory}: the Gram matrix of {columns:,} columns needs "
                              f"{8 * columns**2 / 2**30:.1f} GiB, more than the memory budget "
                              f"({budget / 2**30:.1f} GiB); use fewer samples or Monte-Carlo columns")
        if self.eigenvectors is not None:  # k x D numbers in memory and on disk: refuse what cannot fit
            from curvscope.curvature.spectrum import DEFAULT_TOP_K

            k = min(self.top_k or DEFAULT_TOP_K, columns)
            size = k * problem.num_params * next(iter(problem.params.values())).element_size()
            if size > budget:
                text = (f"up to {k} eigenvectors of {problem.num_params:,} parameters need {size / 2**30:.1f} "
                        f"GiB, more than the memory budget ({budget / 2**30:.1f} GiB)")
                raise OptionError("eigenvectors", f"{text}: pass a smaller top_k", f"{text}: pass a smaller --top-k")


@dataclass
class SpectrumRun:
    """What :func:`run_spectrum` computed."""

    result: SpectrumResult
    step: NewtonStep | None = None
    """The damped Newton step (``options.newton_step``)."""
    vectors: dict[str, Tensor] | None = None
    """Top eigenvectors ``{parameter: (k, *shape)}`` (``options.eigenvectors``)."""
    fields: dict[str, Any] | None = None
    """The report fields (set by :func:`run_spectrum`)."""

    def __repr__(self) -> str:
        g = self.result.groups[0]
        return (f"SpectrumRun(groups={len(self.result.groups)}, rank={g.rank}, lambda_max={g.lambda_max:.4g}, "
                f"newton={'yes' if self.step is not None else 'no'})")


def run_spectrum(problem: Problem, options: SpectrumOptions | None = None, progress: Progress | None = None,
                 process_group: ProcessGroup | None = None) -> SpectrumRun:
    """Compute the spectrum of ``problem`` (no files).

    Args:
        problem: the model, batch and loss.
        options: :class:`SpectrumOptions` (defaults when ``None``); validated here.
        progress: the progress protocol (:mod:`curvscope.progress`).
        process_group: an initialized ``torch.distributed`` group: the call is collective (every rank passes
            the same problem and options) and every rank returns the same numbers.
    """
    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_finite, check_outputs
    from curvscope.curvature.newton import newton_step
    from curvscope.curvature.spectrum import compute_spectrum, eigenvectors
    from curvscope.report import spectrum_report as sr

    options = options or SpectrumOptions()
    comm = None if process_group is None else distributed.Comm.create(process_group, problem.device)
    with distributed.stage(comm):
        options.validate()
        options.check_problem(problem)
        check_outputs(problem)
    seed = options.seed if options.seed is not None else int(problem.info.get("seed") or 0)
    result = compute_spectrum(
        problem, groups=options.groups, mc_samples=options.mc_samples, subsample=options.subsample,
        top_k=options.top_k, directional=options.directions, include_total=options.groups != "all", seed=seed,
        ghost=options.ghost, max_memory=options.parsed_memory(), progress=progress, process_group=process_group,
        eigenvectors=options.eigenvectors is not None or options.newton_step is not None)
    with distributed.stage(comm):
        check_finite("the loss and gradient", loss=result.loss_value, gradient_norm=result.gradient_norm)
        for group in result.groups:
            check_finite(f"the curvature of group {group.name}", eigenvalues=group.eigenvalues, trace=group.trace)
    run = SpectrumRun(result)
    if options.newton_step is not None:
        if progress is not None:
            progress("newton", 0, 1)
        run.step = newton_step(problem, result, options.parsed_damping(), seed=seed, process_group=process_group)
        if progress is not None:
            progress("newton", 1, 1)
    if options.eigenvectors is not None:
        run.vectors = eigenvectors(problem, result, group=0, process_group=process_group)
    with distributed.stage(comm):
        run.fields = sr.spectrum_fields(result, problem.batch_size, directional=options.directions)
        # replaces a stale section when merging into an older report of this problem
        run.fields["newton"] = None if run.step is None else sr.newton_fields(run.step, options.newton_step)
    return run


def claim_spectrum(writer: ReportWriter, options: SpectrumOptions) -> None:
    """Claim the user-given output files before computing (writable, regular, distinct)."""
    for field in ("eigenvectors", "newton_step"):
        path = getattr(options, field)
        if path is not None:
            writer.claim(path, field)


def write_spectrum(writer: ReportWriter, problem: Problem, run: SpectrumRun, options: SpectrumOptions) -> None:
    """Add the spectrum fields, plots and tensor files of ``run`` to ``writer``."""
    from curvscope.report import plots
    from curvscope.report import spectrum_report as sr

    result, step = run.result, run.step
    if run.fields is None:
        raise CurvscopeError("write_spectrum: the run has no report fields (use run_spectrum)")
    writer.section("spectrum", run.fields)
    directions = sr.directions_tensors(result, step) if options.directions else {}
    if directions:
        writer.tensors("directions", writer.out_dir / FILE_NAMES["directions"], directions,
                       {"format": "curvscope.directions", "grouping": options.groups,
                        "groups": [g.name for g in result.groups]})
    if run.vectors is not None:
        total = result.groups[0]
        writer.tensors("eigenvectors", options.eigenvectors,
                       sr.eigenvector_tensors(run.vectors, total.eigenvalues[:total.top_k]),
                       {"format": "curvscope.eigenvectors", "group": total.name, "k": total.top_k,
                        "parameters": list(problem.params)}, "eigenvectors")
    if step is not None:
        writer.tensors("newton_step", options.newton_step,
                       {n: t.detach().cpu().contiguous() for n, t in step.step.items()},
                       {"format": "curvscope.newton_step", "damping": step.damping, "blocks": step.blocks},
                       "newton_step")
    if options.plots:
        for key, name, make in plots.spectrum_plots({**run.fields, "grouping": options.groups}):
            writer.plot(key, name, make)


WORKFLOW = Workflow(name="spectrum", command="spectrum", options=SpectrumOptions, run=run_spectrum,
                    write=write_spectrum, claim=claim_spectrum)
