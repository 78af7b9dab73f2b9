"""``spectrum``: the exact GGN eigenspectrum of a batch, directional derivatives, a damped Newton step.

:class:`SpectrumOptions` are the knobs, :func:`run_spectrum` computes (collectively under
``torch.distributed`` when given a process group) and :func:`write_spectrum` adds the report fields, plots and
tensor files to a :class:`~curvscope.report.writer.ReportWriter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from curvscope import commands
from curvscope.curvature.method import METHODS, matfree_defaults
from curvscope.errors import CurvscopeError
from curvscope.workflows.base import Workflow
from curvscope.workflows.options import OptionError, Options, at_least, at_most, one_of, option

if TYPE_CHECKING:
    from torch import Tensor
    from torch.distributed import ProcessGroup

    from curvscope.curvature.gram.newton import NewtonStep
    from curvscope.curvature.gram.spectrum import SpectrumResult
    from curvscope.curvature.landscape import Landscape
    from curvscope.curvature.matfree.spectrum import MatfreeResult
    from curvscope.curvature.method import SpectrumPlan
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter

COMMAND = commands.get("spectrum")
MIN_MEMORY = 64 * 2**20
"""The smallest memory budget accepted."""
FILE_NAMES = {"directions": "directions.safetensors"}
MAXIMA = {"top_k": 10_000, "mc_samples": 1_000, "trace_samples": 10_000, "density_vectors": 100}
"""The largest value of each count (an absurd one is refused up front, not run for hours; docs/spectrum.md)."""


@dataclass
class SpectrumOptions(Options):
    """Options of the spectrum computation (the ``curvscope spectrum`` flags, in snake_case)."""

    command: ClassVar[str] = COMMAND.command

    groups: str = option("all", "Parameter groups: all (the full GGN), layer (block-diagonal, one block per module "
                         "with parameters) or tensor (one block per parameter tensor). With layer/tensor the whole "
                         "model is reported first, then the blocks.")
    mc_samples: int = option(0, "0: exact loss-Hessian square root (N*C columns). M > 0: Monte-Carlo approximation "
                             "with M columns per sample (N*M columns). At most 1000.")
    subsample: int | None = option(None, "Build the curvature from the first K samples of the batch only (the "
                                   "gradient still uses the whole batch).")
    top_k: int | None = option(None, "Gram: directional quantities (and eigenvectors, Newton step) for the top K "
                               "nonzero directions; default: all nonzero ones, up to 1000. Lanczos (and the Hessian): "
                               "K eigenvalues per end; default: as many of 10 as ``max_memory`` holds, 1 for a model "
                               "of over 10M parameters. At most 10000.")
    directions: bool = option(True, "Compute per-sample directional derivatives gamma_nk, curvatures lambda_nk, "
                              "their SNRs and the gradient overlaps (``directions=False``: eigenvalues only, a bit "
                              "faster).")
    eigenvectors: Path | None = option(None, "Write the top-k eigenvectors of the whole-model GGN to this "
                                       "safetensors file: key '{k}/{parameter}' (k = 0 for the largest eigenvalue) "
                                       "holds eigenvector k's slice for that parameter, 'eigenvalues' the k "
                                       "eigenvalues.")
    newton_step: Path | None = option(None, "Write the damped Newton step along the eigen-directions (the sum of "
                                      "the per-block steps with ``groups`` layer/tensor) to this safetensors file, "
                                      "one tensor per parameter; its predicted and realized loss decrease go into "
                                      "the report.")
    damping: str | float = option("bootstrap", "Damping for ``newton_step``: a constant delta >= 0 (in units of "
                                  "curvature, added to every eigenvalue), or bootstrap: a per-direction delta_k "
                                  "picked by the 5th percentile of the bootstrapped predicted decrease (ViViT), "
                                  "skipping directions with no reliable decrease.")
    max_memory: str | int = option("auto", "Memory budget for the computation, e.g. 4GiB or 512MB; auto: a quarter "
                                   "of the available RAM (half of the free GPU memory). Larger batches are split, "
                                   "not refused.")
    ghost: bool = option(True, "Use the fast per-layer Gram rules where cheaper (``ghost=False``: the generic "
                         "torch.func path for every layer; for debugging).")
    plots: bool = option(True, "Write spectrum.png, directions.png and (with ``groups`` layer/tensor) layers.png.")
    seed: int | None = option(None, "Seed of Monte-Carlo sampling, the bootstrap and Lanczos (None: the problem's "
                              "seed, else 0).")
    curvature: str = option("ggn", "ggn, or hessian: the loss Hessian by Lanczos on Hessian-vector products (both "
                            "ends of its spectrum, a Hutch++ trace, an SLQ density), with the GGN's lambda_max and "
                            "trace beside it.")
    method: str = option("auto", "gram (exact: every eigenvalue, from the N*C x N*C Gram), lanczos (matrix-free: "
                         "the ``top_k`` extremes, Hutch++ trace, SLQ density) or auto: gram when it fits "
                         "``max_memory``, else lanczos.")
    tol: float | None = option(None, "Lanczos: converged when every residual is below tol * |lambda_max|. "
                               "Default: 1e-6 in float64, 1e-4 in float32.")
    trace_samples: int | None = option(None, "Lanczos: products for the Hutch++ trace (exact when at least the "
                                       "group's parameter count). At most 10000. Default: 60; 16 for a model of "
                                       "over 10M parameters.")
    density_vectors: int | None = option(None, "Lanczos: random vectors of the SLQ spectral density (0: none; at "
                                         "most 100). Default: 4; 1 for a model of over 10M parameters.")
    landscape: bool = option(False, "Also write landscape.png: the batch loss along the top eigenvector with the "
                             "quadratic model, and over the plane of the top two.")
    batches: int = option(1, "Analyse B disjoint batches of ``batch_size`` one after another (the batch, then the "
                          "next samples in the same order: file order, or the shuffled order of ``seed``); the report "
                          "keeps each batch's numbers (per_batch) and their mean, std, min and max (batch_stats). "
                          "Memory stays that of one batch; files and plots are of the first batch.")

    def validate(self) -> None:
        """Check every value that needs no Problem."""
        from curvscope.problem import CURVATURES, GROUP_MODES

        super().validate()
        one_of("groups", self.groups, GROUP_MODES)
        if self.mc_samples is None or self.mc_samples < 0:
            raise OptionError("mc_samples", f"must be 0 (exact) or positive, got {self.mc_samples}")
        at_least("mc_samples", self.mc_samples, 0)
        at_least("subsample", self.subsample, 1, optional=True)
        at_least("top_k", self.top_k, 1, optional=True)
        one_of("curvature", self.curvature, CURVATURES)
        one_of("method", self.method, METHODS)
        if self.curvature == "hessian" and self.method == "gram":
            raise OptionError("method", lambda name: f"{name('method')} gram: the Hessian has no Gram factor; use "
                              f"{name('method', 'lanczos')} (or auto)")
        if self.tol is not None and not (0 < self.tol < 1):
            raise OptionError("tol", f"must lie in (0, 1), got {self.tol}")
        at_least("trace_samples", self.trace_samples, 0, optional=True)
        at_least("batches", self.batches, 1)
        at_least("density_vectors", self.density_vectors, 0, optional=True)
        for name, high in MAXIMA.items():
            if getattr(self, name) is not None:
                at_most(name, getattr(self, name), high)
        self.parsed_damping()
        self.parsed_memory()
        if self.subsample is not None and (self.curvature == "hessian" or self.method == "lanczos"):
            raise OptionError("subsample", "applies to the Gram method only (Lanczos uses the whole batch)")
        if self.mc_samples and (self.curvature == "hessian" or self.method == "lanczos"):
            raise OptionError("mc_samples", "applies to the Gram method only (Lanczos uses the exact curvature)")
        if self.newton_step is not None and (self.curvature == "hessian" or self.method == "lanczos"):
            raise OptionError("newton_step", lambda name: f"{name('newton_step')} needs the GGN by Gram "
                              f"({name('curvature', 'ggn')}, {name('method', 'gram')} or auto)")
        if self.newton_step is not None and not self.directions:
            raise OptionError("newton_step", lambda name: f"{name('newton_step')} needs the directional "
                              f"derivatives: leave out {name('directions', False)}")

    def parsed_damping(self) -> float | str:
        """The damping as the engine takes it."""
        from curvscope.curvature.gram.newton import parse_damping

        return parse_damping(self.damping)

    def parsed_memory(self) -> int | None:
        """The memory budget in bytes (``None``: the default); at least :data:`MIN_MEMORY`."""
        from curvscope.curvature.memory import parse_memory

        budget = parse_memory(self.max_memory)
        if budget is not None and budget < MIN_MEMORY:
            raise OptionError("max_memory", f"'{self.max_memory}' is below the floor of {MIN_MEMORY // 2**20} MiB "
                              "(smaller budgets only make the computation crawl)")
        return budget

    def plan(self, problem: Problem) -> SpectrumPlan:
        """How this spectrum will be computed (``auto`` resolved), after the checks that need the problem: the
        engine's rule, :func:`~curvscope.curvature.method.plan_spectrum`."""
        from curvscope.curvature.method import plan_spectrum

        return plan_spectrum(problem, curvature=self.curvature, method=self.method, mc_samples=self.mc_samples,
                             subsample=self.subsample, max_memory=self.parsed_memory(), top_k=self.top_k,
                             eigenvectors=self.eigenvectors is not None)


@dataclass(frozen=True)
class GgnBeside:
    """The whole-model GGN computed beside a Hessian spectrum: how much of the curvature it captures."""

    lambda_max: float | None
    trace: float | None
    method: str
    """``gram`` (exact, when it fits the memory budget) or ``lanczos``."""


@dataclass
class BatchSpectrum:
    """One batch of a spectrum over several batches (``options.batches``): its rows and its engine results."""

    batch_indices: list[int]
    """The dataset rows of the batch."""
    run: SpectrumRun
    """Its spectrum (no files: no Newton step, eigenvectors or landscape)."""


@dataclass
class SpectrumRun:
    """What :func:`run_spectrum` computed: the engine's results and how they were obtained (no report fields;
    :func:`write_spectrum` makes those)."""

    result: SpectrumResult | None = None
    """The Gram spectrum (method ``gram``)."""
    matfree: MatfreeResult | None = None
    """The matrix-free spectrum (method ``lanczos``, or the Hessian)."""
    step: NewtonStep | None = None
    """The damped Newton step (``options.newton_step``)."""
    vectors: dict[str, Tensor] | None = None
    """Top eigenvectors ``{parameter: (k, *shape)}`` (``options.eigenvectors`` or the landscape)."""
    landscape: Landscape | None = None
    """The loss along the top eigenvectors (``options.landscape``)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the numbers were computed (printed by the CLI)."""
    method: str = "gram"
    """The method used: ``gram`` or ``lanczos`` (``auto`` resolved)."""
    curvature: str = "ggn"
    """``ggn`` or ``hessian``."""
    path: str = "vmap"
    """How the curvature products were computed (``vmap``, ``autograd``, ``autograd (double backward)``)."""
    gradient_norm: float | None = None
    """The norm of the batch gradient."""
    ggn: GgnBeside | None = None
    """With the Hessian: the whole-model GGN beside it."""
    batches: list[BatchSpectrum] = field(default_factory=list)
    """With ``options.batches > 1``: every batch's spectrum, the problem's own first; else empty."""
    chunk: int | None = None
    """Samples per chunk streamed through every product (``None``: the whole batch's graph at once)."""

    @property
    def top_eigenvalues(self) -> Tensor:
        """The whole model's (``groups[0]``) eigenvalues, descending: all nonzero ones (Gram) or the top
        ``top_k`` (Lanczos)."""
        if self.result is not None:
            return self.result.groups[0].eigenvalues
        if self.matfree is not None:
            return self.matfree.groups[0].top
        raise CurvscopeError("the run has no spectrum (use run_spectrum)")

    def __repr__(self) -> str:
        groups = (self.result or self.matfree).groups if (self.result or self.matfree) is not None else []
        lambda_max = None if not groups else groups[0].lambda_max
        lambda_max = None if lambda_max is None else float(lambda_max)
        return (f"SpectrumRun(method={self.method}, curvature={self.curvature}, groups={len(groups)}, "
                f"lambda_max={lambda_max}, newton={'yes' if self.step is not None else 'no'}, "
                f"landscape={'yes' if self.landscape is not None else 'no'})")


def run_spectrum(problem: Problem, options: SpectrumOptions | None = None, progress: Progress | None = None,
                 process_group: ProcessGroup | None = None) -> SpectrumRun:
    """Compute the spectrum of ``problem`` (no files, no report fields).

    Args:
        problem: the model, batch and loss.
        options: :class:`SpectrumOptions` (defaults when ``None``); validated here.
        progress: the progress protocol ``progress(stage, done, total)`` (:mod:`curvscope.progress`).
        process_group: an initialized ``torch.distributed`` group: the call is collective (every rank passes
            the same problem and options) and every rank returns the same numbers (Gram method only).

    Returns:
        A :class:`SpectrumRun`: the engine's results, the method chosen and the notes.
    """
    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_outputs
    from curvscope.io.sources import batch_indices

    options = options or SpectrumOptions()
    comm = None if process_group is None else distributed.Comm.create(process_group, problem.device)
    with distributed.stage(comm):
        options.validate()
        plan = options.plan(problem)
        check_outputs(problem)
        further, _ = batch_indices(problem, options.batches)  # too few samples: said before computing
    method, note = plan.method, plan.note
    seed = options.seed if options.seed is not None else int(problem.info.get("seed") or 0)
    runner = _run_gram if method == "gram" else _run_lanczos
    if further and progress is not None:
        progress("batches", 0, options.batches)
    run = runner(problem, options, seed, progress, process_group, comm)
    if further:
        run.batches = _further_batches(problem, options, run, further, runner, seed, progress, process_group, comm)
    if note:
        run.notes.append(note)
    run.notes.extend(problem.info.get("data_notes") or [])  # how the samples were read (a DataLoader's batching)
    if options.landscape:
        run.landscape = _landscape(problem, run)
    return run


def _run_gram(problem: Problem, options: SpectrumOptions, seed: int, progress: Progress | None,
              process_group: ProcessGroup | None, comm: Any) -> SpectrumRun:
    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_finite
    from curvscope.curvature.gram.newton import newton_step
    from curvscope.curvature.gram.spectrum import compute_spectrum, eigenvectors

    result = compute_spectrum(
        problem, groups=options.groups, mc_samples=options.mc_samples, subsample=options.subsample,
        top_k=options.top_k, directional=options.directions, include_total=options.groups != "all", seed=seed,
        ghost=options.ghost, max_memory=options.parsed_memory(), progress=progress, process_group=process_group,
        eigenvectors=options.eigenvectors is not None or options.newton_step is not None or options.landscape)
    with distributed.stage(comm):
        check_finite("the loss and gradient", loss=result.loss_value, gradient_norm=result.gradient_norm)
        for group in result.groups:
            check_finite(f"the curvature of group {group.name}", eigenvalues=group.eigenvalues, trace=group.trace)
    run = SpectrumRun(result=result, method="gram", curvature="ggn", path=getattr(result, "path", "vmap"),
                      gradient_norm=float(result.gradient_norm))
    if options.newton_step is not None:
        if progress is not None:
            progress("newton", 0, 1)
        run.step = newton_step(problem, result, options.parsed_damping(), seed=seed, process_group=process_group)
        if progress is not None:
            progress("newton", 1, 1)
    if options.eigenvectors is not None or options.landscape:
        run.vectors = eigenvectors(problem, result, group=0, process_group=process_group)
    return run


def _run_lanczos(problem: Problem, options: SpectrumOptions, seed: int, progress: Progress | None,
                 process_group: ProcessGroup | None = None, comm: Any = None) -> SpectrumRun:
    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_finite
    from curvscope.curvature.gram.layout import make_layout
    from curvscope.curvature.matfree.spectrum import compute_matfree_spectrum

    chunk = graph = None
    if process_group is None:  # a batch whose graph does not fit the budget streams through in chunks
        from curvscope.curvature.matfree.stream import plan_stream, streamed_gradient

        plan = plan_stream(problem, options.curvature, options.parsed_memory())
        chunk, graph = plan.chunk, plan.graph_bytes
    streamed = _Streamed(progress)
    # the settings not given: by the model's size (a large model gets one eigenvalue per end, a short trace, ...)
    sizes = matfree_defaults(problem.num_params, problem.dtype, top_k=options.top_k,
                             trace_matvecs=options.trace_samples, density_vectors=options.density_vectors,
                             tol=options.tol)

    def matfree(curvature: str, groups: str, top_k: int | None, vectors: bool, density: int):
        return compute_matfree_spectrum(
            problem, curvature=curvature, groups=groups, top_k=top_k, tol=sizes.tol,
            max_memory=options.parsed_memory(), trace_matvecs=sizes.trace_matvecs, density_vectors=density,
            eigenvectors=vectors, include_total=groups != "all", seed=seed, progress=streamed,
            process_group=process_group, chunk_size=chunk, max_matvecs=sizes.max_matvecs, graph_bytes=graph)

    # top_k None: up to DEFAULT_LANCZOS_K eigenvalues per end, as many as the memory budget holds
    result = matfree(options.curvature, options.groups, sizes.top_k,
                     options.eigenvectors is not None or options.landscape, sizes.density_vectors)
    with distributed.stage(comm):
        for group in result.groups:
            check_finite(f"the curvature of group {group.name}", eigenvalues=group.top, trace=group.trace)
    if chunk is None:
        gradient = make_layout(problem, process_group, check=False).gradient(problem)
    else:
        gradient = streamed_gradient(problem, chunk)
    run = SpectrumRun(matfree=result, vectors=result.eigenvectors, method="lanczos", curvature=result.curvature,
                      path="autograd (double backward)",  # no rows of V: every product is a double backward
                      gradient_norm=float(sum(float((g.double() ** 2).sum()) for g in gradient.values()) ** 0.5))
    if sizes.note:
        run.notes.append(sizes.note)
    run.notes.extend(result.notes)
    if not result.converged:
        run.notes.append(f"Lanczos did not reach the tolerance {sizes.tol:g} for every eigenvalue (residuals are in "
                         "the report; a repeated eigenvalue may have copies not yet found): loosen the tolerance "
                         "or ask for fewer eigenvalues (top_k)")
    if options.curvature == "hessian":  # how much of the curvature the GGN captures
        run.ggn = _ggn_beside(problem, options, seed, progress, matfree, process_group, gram=chunk is None)
    if chunk is not None:
        run.chunk = chunk
        held = f"; the samples are {problem.batch.held.note}" if problem.held else ""
        run.notes.append(f"the batch of {problem.batch_size:,} samples streamed through every product in chunks of "
                         f"{chunk:,} (one chunk's autograd graph in memory{held}): {_rate(streamed.rate())} "
                         "samples/s")
    return run


def _rate(value: float) -> str:
    """A rate to three significant digits with thousands separators: ``12,345``, ``42.1``, ``0.314``."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


class _Streamed:
    """Passes progress on, and times the samples streamed through the products (stage ``samples``)."""

    def __init__(self, progress: Progress | None):
        import time

        self.progress, self.clock, self.started = progress, time.perf_counter, None
        self.base = self.last = 0  # each operator counts from 0: the samples of the operators before it, its own

    def __call__(self, stage: str, done: int | None, total: int | None) -> None:
        if stage == "samples":
            self.started = self.started or self.clock()
            if (done or 0) < self.last:
                self.base += self.last
            self.last = done or 0
            done = self.samples
        if self.progress is not None:
            self.progress(stage, done, total)

    @property
    def samples(self) -> int:
        """Samples streamed through the products so far."""
        return self.base + self.last

    def rate(self) -> float:
        """Samples per second through the products."""
        return self.samples / max(self.clock() - (self.started or self.clock()), 1e-9)


def _ggn_beside(problem: Problem, options: SpectrumOptions, seed: int, progress: Progress | None, matfree: Any,
                process_group: ProcessGroup | None = None, gram: bool = True) -> GgnBeside:
    """The whole-model GGN's lambda_max and trace: exact by Gram when it fits (and ``gram``), else by Lanczos."""
    ggn_options = options.replace(curvature="ggn", method="auto", groups="all", directions=False, eigenvectors=None,
                                  newton_step=None, landscape=False)
    if gram and ggn_options.plan(problem).method == "gram":
        from curvscope.curvature.gram.spectrum import compute_spectrum

        g = compute_spectrum(problem, groups="all", directional=False, seed=seed, ghost=options.ghost,
                             max_memory=options.parsed_memory(), progress=progress,
                             process_group=process_group).groups[0]
        return GgnBeside(lambda_max=float(g.lambda_max), trace=float(g.trace), method="gram")
    g = matfree("ggn", "all", 1, False, 0).groups[0]
    return GgnBeside(lambda_max=g.lambda_max, trace=g.trace, method="lanczos")


def _further_batches(problem: Problem, options: SpectrumOptions, run: SpectrumRun, further: list[Tensor], runner: Any,
                     seed: int, progress: Progress | None, process_group: ProcessGroup | None, comm: Any
                     ) -> list[BatchSpectrum]:
    """The spectrum of each further batch, one batch at a time (each batch's problem is dropped after its run), by
    the method of the first."""
    from dataclasses import replace

    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_outputs

    each = options.replace(eigenvectors=None, newton_step=None, landscape=False, method=run.method, batches=1)
    out = [BatchSpectrum(list(problem.info["batch_indices"]), replace(run, step=None, vectors=None, landscape=None))]
    for b, indices in enumerate(further, start=1):
        batch = problem.batch_from_dataset(indices)
        with distributed.stage(comm):
            check_outputs(batch)
        out.append(BatchSpectrum([int(i) for i in indices.tolist()],
                                 runner(batch, each, seed, progress, process_group, comm)))
        del batch
        if progress is not None:
            progress("batches", b + 1, options.batches)
    return out


def _landscape(problem: Problem, run: SpectrumRun) -> Landscape:
    from curvscope.curvature.landscape import loss_landscape

    if not run.vectors:
        raise OptionError("landscape", "needs at least one nonzero eigen-direction of the whole model")
    top = [float(v) for v in run.top_eigenvalues.tolist()]
    k = min(2, next(iter(run.vectors.values())).shape[0])
    directions = {n: v[:k] for n, v in run.vectors.items()}
    return loss_landscape(problem, directions, eigenvalue=top[0] if top and top[0] > 0 else None,
                          points_2d=15 if k > 1 else 0, chunk_size=run.chunk)


def claim_spectrum(writer: ReportWriter, options: SpectrumOptions) -> None:
    """Claim the user-given output files before computing (writable, regular, distinct)."""
    for name in ("eigenvectors", "newton_step"):
        path = getattr(options, name)
        if path is not None:
            writer.claim_option(path, name)


def report_fields(problem: Problem, run: SpectrumRun, options: SpectrumOptions) -> dict[str, Any]:
    """The report fields of ``run`` (the report's top level; without ``notes`` and ``files``), made by the report
    builders of :mod:`curvscope.report.spectrum_report` (Gram) and :mod:`curvscope.report.matfree_report`."""
    from curvscope.report import matfree_report as mr
    from curvscope.report import spectrum_report as sr

    if run.result is not None:
        fields = sr.gram_section(run.result, problem.batch_size, directional=options.directions,
                                 dtype=problem.precision, path=run.path, step=run.step,
                                 newton_file=options.newton_step)
    elif run.matfree is not None:
        fields = mr.lanczos_section(run.matfree, problem.batch_size, gradient_norm=run.gradient_norm, path=run.path,
                                    ggn=run.ggn)
    else:
        raise CurvscopeError("write_spectrum: the run has no results (use run_spectrum)")
    if run.landscape is not None:
        fields["landscape"] = mr.landscape_fields(run.landscape, [float(v) for v in run.top_eigenvalues.tolist()])
    fields["per_batch"] = fields["batch_stats"] = None  # set either way: a merge drops an older run's
    if run.batches:
        from curvscope.report.batch_report import batch_entry, batch_stats

        each = options.replace(eigenvectors=None, newton_step=None, landscape=False, batches=1)
        fields["per_batch"] = [batch_entry(fields if i == 0 else report_fields(problem, b.run, each), b.batch_indices)
                               for i, b in enumerate(run.batches)]
        fields["batch_stats"] = batch_stats(fields["per_batch"])
    return fields


def write_spectrum(writer: ReportWriter, problem: Problem, run: SpectrumRun, options: SpectrumOptions) -> None:
    """Add the spectrum fields, plots and tensor files of ``run`` to ``writer``."""
    from curvscope.report import spectrum_report as sr

    fields = report_fields(problem, run, options)
    writer.section(COMMAND.command, {**fields, "notes": list(run.notes)})
    result, step = run.result, run.step
    directions = sr.directions_tensors(result, step) if result is not None and options.directions else {}
    if directions:
        writer.tensors("directions", writer.out_dir / FILE_NAMES["directions"], directions,
                       {"format": "curvscope.directions", "grouping": options.groups,
                        "groups": [g.name for g in result.groups]})
    if options.eigenvectors is not None and run.vectors is not None:
        k = next(iter(run.vectors.values())).shape[0]
        writer.tensors("eigenvectors", options.eigenvectors,
                       sr.eigenvector_tensors(run.vectors, run.top_eigenvalues[:k]),
                       {"format": "curvscope.eigenvectors", "group": fields["groups"][0]["name"], "k": k,
                        "curvature": run.curvature, "parameters": list(problem.params)},
                       "eigenvectors")
    if step is not None:
        writer.tensors("newton_step", options.newton_step,
                       {n: t.detach().cpu().contiguous() for n, t in step.step.items()},
                       {"format": "curvscope.newton_step", "damping": step.damping, "blocks": step.blocks},
                       "newton_step")
    if options.plots:
        from curvscope.report import plots  # matplotlib: only when drawing

        for key, name, make in plots.spectrum_plots({**fields, "grouping": options.groups}):
            writer.plot(key, name, make)


WORKFLOW = Workflow(COMMAND.name, options=SpectrumOptions, run=run_spectrum, write=write_spectrum,
                    claim=claim_spectrum)
