"""``spectrum``: the exact GGN eigenspectrum of a batch, directional derivatives, a damped Newton step.

:class:`SpectrumOptions` are the knobs, :func:`run_spectrum` computes (collectively under
``torch.distributed`` when given a process group) and :func:`write_spectrum` adds the report fields, plots and
tensor files to a :class:`~curvscope.report.writer.ReportWriter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from curvscope.errors import CurvscopeError
from curvscope.workflows.base import Workflow
from curvscope.workflows.options import OptionError, Options, at_least, one_of

if TYPE_CHECKING:
    from torch import Tensor
    from torch.distributed import ProcessGroup

    from curvscope.curvature.gram.newton import NewtonStep
    from curvscope.curvature.gram.spectrum import SpectrumResult
    from curvscope.curvature.landscape import Landscape
    from curvscope.curvature.matfree.spectrum import MatfreeResult
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter

GROUP_MODES = ("all", "layer", "tensor")
CURVATURES = ("ggn", "hessian")
METHODS = ("auto", "gram", "lanczos")
DEFAULT_LANCZOS_K = 10
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
    """Seed of Monte-Carlo sampling, the bootstrap and Lanczos (None: the problem's seed, else 0)."""
    curvature: str = "ggn"
    """``ggn``, or ``hessian`` (matrix-free: Lanczos, Hutch++, SLQ; the GGN is computed beside it)."""
    method: str = "auto"
    """``gram`` (exact, all eigenvalues), ``lanczos`` (matrix-free, the extremes) or ``auto`` (gram when
    its Gram matrix fits the memory budget)."""
    tol: float = 1e-6
    """Lanczos: a Ritz value counts as converged when its residual is below tol * |lambda_max|."""
    trace_samples: int = 60
    """Lanczos: matrix-vector products for the Hutch++ trace (exact when at least the group's size)."""
    density_vectors: int = 4
    """Lanczos: random start vectors of the SLQ spectral density of the whole model (0: no density)."""
    landscape: bool = False
    """The batch loss along the top eigenvector and over the plane of the top two (landscape.png)."""

    def validate(self) -> None:
        """Check every value that needs no Problem."""
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
        if not (0 < self.tol < 1):
            raise OptionError("tol", f"must lie in (0, 1), got {self.tol}")
        at_least("trace_samples", self.trace_samples, 0)
        at_least("density_vectors", self.density_vectors, 0)
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

        return _engine_parse("damping", parse_damping, self.damping)

    def parsed_memory(self) -> int | None:
        """The memory budget in bytes (``None``: the default); at least :data:`MIN_MEMORY`."""
        from curvscope.curvature.memory import parse_memory

        budget = _engine_parse("max_memory", parse_memory, self.max_memory)
        if budget is not None and budget < MIN_MEMORY:
            raise OptionError("max_memory", f"'{self.max_memory}' is below the floor of {MIN_MEMORY // 2**20} MiB "
                              "(smaller budgets only make the computation crawl)")
        return budget

    def gram_bytes(self, problem: Problem) -> tuple[int, int]:
        """``(columns, bytes)`` of the float64 Gram matrix this problem and these options need: N·C exact,
        N·M Monte-Carlo; for sequences N·T_v·C and N·T_v·M (T_v: the most valid tokens of one sequence)."""
        from curvscope.curvature.gram.columns import count_columns

        columns = count_columns(problem, self.mc_samples, self.subsample)
        return columns, 8 * columns**2

    def resolved_method(self, problem: Problem) -> tuple[str, str | None]:
        """``("gram" | "lanczos", note)``: ``auto`` picks the Gram when it fits the memory budget."""
        from curvscope.curvature.gram.columns import seed_bytes
        from curvscope.curvature.memory import MemoryPlan, format_bytes

        if self.curvature == "hessian" or self.method == "lanczos":
            return "lanczos", None
        columns, size = self.gram_bytes(problem)
        plan = MemoryPlan.default(problem.device, self.parsed_memory())
        budget = plan.budget
        seeds = seed_bytes(problem, self.mc_samples, self.subsample)
        if size <= budget and seeds <= plan.limit:
            return "gram", None
        what = (f"the Gram matrix of {columns:,} columns needs {format_bytes(size)}" if size > budget else
                f"the seeds of the {columns:,} columns (one vector of {problem.num_outputs:,} outputs each) need "
                f"{format_bytes(seeds)}")
        if self.method == "gram" or self.mc_samples:  # an explicit Gram request is refused, not replaced
            raise OptionError("mc_samples" if self.mc_samples else "max_memory",
                              f"{self.mc_samples or self.max_memory}: {what}, more than the memory budget "
                              f"({format_bytes(budget)}); use fewer samples or Monte-Carlo columns, or method "
                              "lanczos")
        return "lanczos", (f"the exact Gram method does not fit the memory budget ({format_bytes(budget)}): "
                           f"{what}; used Lanczos on GGN-vector products (the extreme eigenvalues, a Hutch++ "
                           "trace and an SLQ density)")

    def check_problem(self, problem: Problem) -> None:
        """Checks that need the Problem (before the long computation)."""
        if self.subsample is not None and self.subsample > problem.batch_size:
            raise OptionError("subsample", f"{self.subsample} is larger than the batch ({problem.batch_size} "
                              "samples)")
        from curvscope.curvature.memory import MemoryPlan, format_bytes

        method, _ = self.resolved_method(problem)
        columns, _ = self.gram_bytes(problem)
        budget = MemoryPlan.default(problem.device, self.parsed_memory()).budget
        if self.eigenvectors is not None:  # k x D numbers in memory and on disk: refuse what cannot fit
            from curvscope.curvature.gram.spectrum import DEFAULT_TOP_K

            k = min(self.top_k or (DEFAULT_TOP_K if method == "gram" else DEFAULT_LANCZOS_K), columns)
            size = k * problem.num_params * next(iter(problem.params.values())).element_size()
            if size > budget:
                text = (f"up to {k} eigenvectors of {problem.num_params:,} parameters need {format_bytes(size)}, "
                        f"more than the memory budget ({format_bytes(budget)})")
                raise OptionError("eigenvectors", lambda name: f"{name('eigenvectors')} {text}: pass a smaller "
                                  f"{name('top_k')}")


def _engine_parse(parameter: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """``parse(value)`` by the engine as a check of the option ``parameter``: the engine's refusal, a
    :class:`CurvscopeError` in its own words that starts with the parameter's name (``damping 'x': expected
    ...``), is raised as the :class:`OptionError` of that parameter (so the CLI names the flag). To go once
    ``parse_damping`` and ``parse_memory`` raise :class:`OptionError` themselves."""
    try:
        return parse(value)
    except (OverflowError, ValueError) as exc:
        raise OptionError(parameter, f"'{str(value)[:40]}' is out of range ({type(exc).__name__})") from None
    except OptionError:
        raise
    except CurvscopeError as exc:
        text = str(exc)
        if not text.startswith(parameter + " "):
            raise
        raise OptionError(parameter, text[len(parameter) + 1:]) from None


@dataclass
class SpectrumRun:
    """What :func:`run_spectrum` computed."""

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
    fields: dict[str, Any] | None = None
    """The report fields (set by :func:`run_spectrum`)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the numbers were computed (printed by the CLI)."""

    def __repr__(self) -> str:
        g = (self.fields or {}).get("groups", [{}])[0]
        return (f"SpectrumRun(method={(self.fields or {}).get('method', 'gram')}, groups="
                f"{len((self.fields or {}).get('groups', []))}, lambda_max={g.get('lambda_max')}, "
                f"newton={'yes' if self.step is not None else 'no'})")


def run_spectrum(problem: Problem, options: SpectrumOptions | None = None, progress: Progress | None = None,
                 process_group: ProcessGroup | None = None) -> SpectrumRun:
    """Compute the spectrum of ``problem`` (no files).

    Args:
        problem: the model, batch and loss.
        options: :class:`SpectrumOptions` (defaults when ``None``); validated here.
        progress: the progress protocol (:mod:`curvscope.progress`).
        process_group: an initialized ``torch.distributed`` group: the call is collective (every rank passes
            the same problem and options) and every rank returns the same numbers (Gram method only).
    """
    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_outputs

    options = options or SpectrumOptions()
    comm = None if process_group is None else distributed.Comm.create(process_group, problem.device)
    with distributed.stage(comm):
        options.validate()
        options.check_problem(problem)
        check_outputs(problem)
        method, note = options.resolved_method(problem)
    seed = options.seed if options.seed is not None else int(problem.info.get("seed") or 0)
    if method == "gram":
        run = _run_gram(problem, options, seed, progress, process_group, comm)
    else:
        run = _run_lanczos(problem, options, seed, progress, process_group, comm)
    if note:
        run.notes.append(note)
    if options.landscape:
        run.landscape, run.fields["landscape"] = _landscape(problem, run, options)
    return run


def _run_gram(problem: Problem, options: SpectrumOptions, seed: int, progress: Progress | None,
              process_group: ProcessGroup | None, comm: Any) -> SpectrumRun:
    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_finite
    from curvscope.curvature.gram.newton import newton_step
    from curvscope.curvature.gram.spectrum import compute_spectrum, eigenvectors
    from curvscope.report import spectrum_report as sr

    result = compute_spectrum(
        problem, groups=options.groups, mc_samples=options.mc_samples, subsample=options.subsample,
        top_k=options.top_k, directional=options.directions, include_total=options.groups != "all", seed=seed,
        ghost=options.ghost, max_memory=options.parsed_memory(), progress=progress, process_group=process_group,
        eigenvectors=options.eigenvectors is not None or options.newton_step is not None or options.landscape)
    with distributed.stage(comm):
        check_finite("the loss and gradient", loss=result.loss_value, gradient_norm=result.gradient_norm)
        for group in result.groups:
            check_finite(f"the curvature of group {group.name}", eigenvalues=group.eigenvalues, trace=group.trace)
    run = SpectrumRun(result=result)
    if options.newton_step is not None:
        if progress is not None:
            progress("newton", 0, 1)
        run.step = newton_step(problem, result, options.parsed_damping(), seed=seed, process_group=process_group)
        if progress is not None:
            progress("newton", 1, 1)
    if options.eigenvectors is not None or options.landscape:
        run.vectors = eigenvectors(problem, result, group=0, process_group=process_group)
    with distributed.stage(comm):
        run.fields = sr.spectrum_fields(result, problem.batch_size, directional=options.directions,
                                        dtype=problem.dtype)
        # replaces stale sections when merging into an older report of this problem
        run.fields.update(curvature="ggn", method="gram", comparison=None, landscape=None,
                          path=getattr(result, "path", "vmap"))
        run.fields["newton"] = None if run.step is None else sr.newton_fields(run.step, options.newton_step)
    return run


def _run_lanczos(problem: Problem, options: SpectrumOptions, seed: int, progress: Progress | None,
                 process_group: ProcessGroup | None = None, comm: Any = None) -> SpectrumRun:
    from curvscope.curvature import distributed
    from curvscope.curvature.finite import check_finite
    from curvscope.curvature.gram.layout import make_layout
    from curvscope.curvature.matfree.spectrum import compute_matfree_spectrum
    from curvscope.report import matfree_report as mr

    def matfree(curvature: str, groups: str, top_k: int, vectors: bool, density: int):
        return compute_matfree_spectrum(
            problem, curvature=curvature, groups=groups, top_k=top_k, tol=options.tol,
            trace_matvecs=options.trace_samples, density_vectors=density, eigenvectors=vectors,
            include_total=groups != "all", seed=seed, progress=progress, process_group=process_group)

    k = options.top_k or DEFAULT_LANCZOS_K
    result = matfree(options.curvature, options.groups, k, options.eigenvectors is not None or options.landscape,
                     options.density_vectors)
    with distributed.stage(comm):
        for group in result.groups:
            check_finite(f"the curvature of group {group.name}", eigenvalues=group.top, trace=group.trace)
    run = SpectrumRun(matfree=result, vectors=result.eigenvectors)
    run.fields = mr.matfree_fields(result, problem.batch_size)
    gradient = make_layout(problem, process_group, check=False).gradient(problem)
    run.fields["gradient_norm"] = float(sum(float((g.double() ** 2).sum()) for g in gradient.values()) ** 0.5)
    run.fields["comparison"] = None
    run.fields["landscape"] = None
    run.fields["path"] = "autograd (double backward)"
    run.fields["rules"] = None  # no rows of V: every product is a double backward
    if not result.converged:
        run.notes.append(f"Lanczos did not reach the tolerance {options.tol:g} for every eigenvalue (residuals are in "
                         "the report): loosen the tolerance or ask for fewer eigenvalues (top_k)")
    if options.curvature == "hessian":  # how much of the curvature the GGN captures
        ggn = _ggn_beside(problem, options, seed, progress, matfree, process_group)
        run.fields["comparison"] = mr.comparison_fields(run.fields["groups"][0], ggn)
    return run


def _ggn_beside(problem: Problem, options: SpectrumOptions, seed: int, progress: Progress | None, matfree: Any,
                process_group: ProcessGroup | None = None) -> dict[str, Any]:
    """The whole-model GGN's lambda_max and trace: exact by Gram when it fits, else by Lanczos."""
    ggn_options = options.replace(curvature="ggn", method="auto", groups="all", directions=False, eigenvectors=None,
                                  newton_step=None, landscape=False)
    method, _ = ggn_options.resolved_method(problem)
    if method == "gram":
        from curvscope.curvature.gram.spectrum import compute_spectrum

        g = compute_spectrum(problem, groups="all", directional=False, seed=seed, ghost=options.ghost,
                             max_memory=options.parsed_memory(), progress=progress,
                             process_group=process_group).groups[0]
        return {"lambda_max": float(g.lambda_max), "trace": float(g.trace), "method": "gram"}
    g = matfree("ggn", "all", 1, False, 0).groups[0]
    return {"lambda_max": g.lambda_max, "trace": g.trace, "method": "lanczos"}


def _landscape(problem: Problem, run: SpectrumRun, options: SpectrumOptions) -> tuple[Landscape, dict[str, Any]]:
    from curvscope.curvature.landscape import loss_landscape
    from curvscope.report import matfree_report as mr

    if not run.vectors:
        raise OptionError("landscape", "needs at least one nonzero eigen-direction of the whole model")
    top = run.fields["groups"][0]["eigenvalues"]
    top = [float(v) for v in (top.tolist() if hasattr(top, "tolist") else top)]
    k = min(2, next(iter(run.vectors.values())).shape[0])
    directions = {n: v[:k] for n, v in run.vectors.items()}
    land = loss_landscape(problem, directions, eigenvalue=top[0] if top and top[0] > 0 else None,
                          points_2d=15 if k > 1 else 0)
    return land, mr.landscape_fields(land, top)


def claim_spectrum(writer: ReportWriter, options: SpectrumOptions) -> None:
    """Claim the user-given output files before computing (writable, regular, distinct)."""
    for name in ("eigenvectors", "newton_step"):
        path = getattr(options, name)
        if path is not None:
            writer.claim_option(path, name)


def write_spectrum(writer: ReportWriter, problem: Problem, run: SpectrumRun, options: SpectrumOptions) -> None:
    """Add the spectrum fields, plots and tensor files of ``run`` to ``writer``."""
    from curvscope.report import spectrum_report as sr

    if run.fields is None:
        raise CurvscopeError("write_spectrum: the run has no report fields (use run_spectrum)")
    writer.section("spectrum", {**run.fields, "notes": list(run.notes)})
    result, step = run.result, run.step
    directions = sr.directions_tensors(result, step) if result is not None and options.directions else {}
    if directions:
        writer.tensors("directions", writer.out_dir / FILE_NAMES["directions"], directions,
                       {"format": "curvscope.directions", "grouping": options.groups,
                        "groups": [g.name for g in result.groups]})
    if options.eigenvectors is not None and run.vectors is not None:
        top = run.fields["groups"][0]
        k = next(iter(run.vectors.values())).shape[0]
        eigenvalues = result.groups[0].eigenvalues[:k] if result is not None else run.matfree.groups[0].top[:k]
        writer.tensors("eigenvectors", options.eigenvectors, sr.eigenvector_tensors(run.vectors, eigenvalues),
                       {"format": "curvscope.eigenvectors", "group": top["name"], "k": k,
                        "curvature": run.fields.get("curvature", "ggn"), "parameters": list(problem.params)},
                       "eigenvectors")
    if step is not None:
        writer.tensors("newton_step", options.newton_step,
                       {n: t.detach().cpu().contiguous() for n, t in step.step.items()},
                       {"format": "curvscope.newton_step", "damping": step.damping, "blocks": step.blocks},
                       "newton_step")
    if options.plots:
        from curvscope.report import plots  # matplotlib: only when drawing

        for key, name, make in plots.spectrum_plots({**run.fields, "grouping": options.groups}):
            writer.plot(key, name, make)


WORKFLOW = Workflow(name="spectrum", command="spectrum", options=SpectrumOptions, run=run_spectrum,
                    write=write_spectrum, claim=claim_spectrum)
