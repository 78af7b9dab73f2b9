"""Matrix-free curvature spectrum: extreme eigenvalues, trace and spectral density of the Hessian or the GGN.

``docs/conventions.md`` §9. Per parameter group, the curvature matrix is reached through products only
(:mod:`curvscope.curvature.matfree.operators`) and handed to the generic estimators of
:mod:`curvscope.curvature.matfree` (:mod:`~curvscope.curvature.matfree.eigen`,
:mod:`~curvscope.curvature.matfree.trace`, :mod:`~curvscope.curvature.matfree.density`):

- extreme eigenvalues by a restarted block Krylov method in a basis bounded by the memory budget
  (:func:`~curvscope.curvature.matfree.block.block_eigenpairs`: thick restart, locking, a final check for missed
  copies of repeated eigenvalues), each Ritz value with its true residual ``||A q - theta q||``; converged when
  every residual is ``<= tol * ||A||`` and no reported value can be displaced by a missed copy. The Hessian is
  indefinite: both ends are reported (top k largest and bottom k smallest algebraic eigenvalues); the GGN is
  positive semi-definite and only its top k are computed;
- the trace by Hutch++ with Rademacher vectors and a standard error (the exact trace from ``dim`` unit vectors
  when the budget reaches ``dim``);
- the spectral density by stochastic Lanczos quadrature (SLQ), for the first group only (the whole model
  whenever ``groups == "all"`` or ``include_total``); it integrates to 1 (multiply by D for eigenvalue counts).

Everything is deterministic in ``seed``: each group and each estimator draws from its own CPU
``torch.Generator`` seeded from ``seed``, the group's index and the estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvscope.curvature.matfree.block import BlockPlan, block_eigenpairs, default_max_basis, plan_block
from curvscope.curvature.matfree.budget import vectors_within
from curvscope.curvature.matfree.density import Density, spectral_density
from curvscope.curvature.matfree.lean import LEAN_VECTORS, lean_extremes
from curvscope.curvature.matfree.operators import CURVATURES, curvature_operator
from curvscope.curvature.matfree.trace import hutchpp
from curvscope.curvature.method import DEFAULT_LANCZOS_K, LARGE_MODEL_PARAMS
from curvscope.curvature.results import Spectrum, SpectrumGroup
from curvscope.errors import CurvscopeError, OptionError
from curvscope.problem import GROUP_MODES
from curvscope.progress import Progress, or_silent, stage

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_EIGEN, _TRACE, _DENSITY = 0, 1, 2  # estimator index in the seed of its generator


@dataclass(repr=False)
class MatfreeGroup(SpectrumGroup):
    """The matrix-free spectrum of one block of the (block-diagonal) Hessian or GGN.

    Attributes:
        name, param_names, num_params: the group (``num_params`` = D_P, the operator's dimension).
        top: ``(k,)`` largest algebraic Ritz values, descending.
        top_residuals: ``(k,)`` their residuals ``||A q - theta q||`` (unit Ritz vectors q).
        bottom: ``(k,)`` smallest algebraic Ritz values, ascending (Hessian); ``None`` for the GGN.
        bottom_residuals: ``(k,)`` their residuals (Hessian); ``None`` for the GGN.
        converged: every reported residual is ``<= tol * max |theta|``.
        tol: the relative residual tolerance.
        steps: Lanczos steps of the eigenvalue run.
        trace: trace estimate (Hutch++, or exact); ``None`` when ``trace_matvecs == 0``.
        trace_stderr: its standard error (0.0 when exact, NaN with a single Hutchinson vector).
        trace_method: ``"hutch++"``, ``"hutchinson"`` or ``"exact"`` (``None`` without a trace).
        density: the SLQ :class:`~curvscope.curvature.matfree.density.Density` (``grid`` ``(G,)``, ``values``
            ``(G,)``, Ritz ``nodes``/``weights`` ``(n_v, m)``, ``sigma``), for the first group only, else ``None``.
        negative_mass: Hessian with a density: the share of the spectrum clearly below zero, the SLQ
            quadrature weight of the Ritz values below ``-sigma`` (the kernel width),
            ``(1/n_v) sum_v sum_i tau_vi [theta_vi < -sigma]``: the smoothed cluster of near-zero eigenvalues
            does not count (the report's ``negative_mass``); ``None`` otherwise.
        density_below_zero: Hessian with a density: the smoothed density's mass below 0,
            ``(1/n_v) sum_v sum_i tau_vi Phi(-theta_vi / sigma)`` (the exact integral of the Gaussian-kernel
            density over ``(-inf, 0)``), which counts about half of that cluster; ``None`` otherwise.
        matvecs: products with this group's operator (eigenvalues, residual checks, trace and density).
        certain: how many of the top (and, for the Hessian, bottom) values are certain: within tolerance and not
            displaceable by a missed copy of a repeated eigenvalue (``converged`` means all of them).
        block_size, max_basis: the eigensolver's plan (vectors per product block, basis vectors at most).
        solver: ``"block"`` (restarted block Krylov, explicit residuals) or ``"lean"`` (one value per end by
            Lanczos in two vectors; the residuals are Paige's bounds ``beta_j |s_j|``, ``max_basis`` 0).
    """

    name: str
    param_names: tuple[str, ...]
    num_params: int
    top: Tensor
    top_residuals: Tensor
    bottom: Tensor | None
    bottom_residuals: Tensor | None
    converged: bool
    tol: float
    steps: int
    trace: float | None
    trace_stderr: float | None
    trace_method: str | None
    density: Density | None
    negative_mass: float | None
    density_below_zero: float | None
    matvecs: int
    certain: int = 0
    block_size: int = 1
    max_basis: int = 0
    solver: str = "block"

    @property
    def eigenvalues(self) -> Tensor:
        """``(k,)`` the top Ritz values, descending (the same as ``top``; the name both wings share)."""
        return self.top

    @property
    def lambda_min(self) -> float | None:
        """The smallest eigenvalue (Hessian); ``None`` for the GGN (positive semi-definite, not computed)."""
        return None if self.bottom is None else float(self.bottom[0])

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}", f"D={self.num_params}", f"lambda_max={self.lambda_max:.6g}"]
        if self.lambda_min is not None:
            parts.append(f"lambda_min={self.lambda_min:.6g}")
        if self.trace is not None:
            parts.append(f"trace={self.trace:.6g}")
        if self.negative_mass is not None:
            parts.append(f"negative_mass={self.negative_mass:.3g}")
        parts += [f"converged={self.converged}", f"matvecs={self.matvecs}"]
        return f"MatfreeGroup({', '.join(parts)})"


@dataclass(repr=False)
class MatfreeResult(Spectrum):
    """What :func:`compute_matfree_spectrum` returns.

    Attributes:
        groups: one :class:`MatfreeGroup` per block; with ``include_total`` and a grouping other than ``all``,
            ``groups[0]`` is the whole model.
        curvature: ``"hessian"`` or ``"ggn"``.
        method: ``"lanczos"``.
        loss_value: the batch loss L.
        matvecs: products over all groups.
        seed: the seed of every random draw.
        grouping: ``all``, ``layer`` or ``tensor``.
        eigenvectors: with ``eigenvectors=True``: name -> ``(k, *param.shape)``, the unit Ritz vectors of
            ``groups[0].top`` (rows aligned with it; zeros outside the group; sign arbitrary); else ``None``.
    """

    groups: list[MatfreeGroup]
    curvature: str
    method: str
    loss_value: float
    matvecs: int
    seed: int
    grouping: str = "all"
    eigenvectors: dict[str, Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    """How the plan was fitted to the memory budget (fewer eigenvalues than the default, ...)."""

    @property
    def density(self) -> Density | None:
        """The SLQ density (of ``groups[0]``)."""
        return self.groups[0].density if self.groups else None

    @property
    def converged(self) -> bool:
        """Every group converged (each reported residual within its tolerance)."""
        return all(g.converged for g in self.groups)

    def __repr__(self) -> str:
        return (f"MatfreeResult(curvature={self.curvature!r}, method={self.method!r}, groups={len(self.groups)}, "
                f"loss_value={self.loss_value:.6g}, matvecs={self.matvecs}, seed={self.seed})")


def _generator(seed: int, group: int, estimator: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 3 * group + estimator)


def _checked(name: str, value: int, minimum: int) -> int:
    if int(value) != value or value < minimum:
        raise CurvscopeError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _share(report: Callable[[int, int], None], shares: list[int], i: int) -> Progress:
    """Group ``i``'s estimator progress as its share of a stage summed over the groups: its ``done`` moves the
    stage (bound by :func:`curvscope.progress.stage`) to ``sum(shares[:i]) + min(done, shares[i])`` of
    ``sum(shares)``; after the group, ``report(sum(shares[:i + 1]), sum(shares))`` ends its share (a group that
    stops early jumps to the end of it)."""
    offset, total = sum(shares[:i]), sum(shares)

    def forward(_stage: str, done: int, _total: int | None) -> None:
        report(offset + min(done, shares[i]), total)

    return forward


def _negative_mass(density: Density) -> float:
    """``(1/n_v) sum tau [theta < -sigma]``: the quadrature weight of the Ritz values clearly below zero."""
    below = (density.nodes < -density.sigma).to(torch.float64)
    return float((density.weights.to(torch.float64) * below).sum() / density.nodes.shape[0])


def _density_below_zero(density: Density) -> float:
    """``(1/n_v) sum tau Phi(-theta / sigma)``: the Gaussian-kernel density's mass below 0."""
    cdf = 0.5 * torch.erfc(density.nodes.to(torch.float64) / (density.sigma * math.sqrt(2.0)))
    return float((density.weights.to(torch.float64) * cdf).sum() / density.nodes.shape[0])


def plan_eigen(dim: int, top_k: int | None, which: str, budget: int, itemsize: int, *, want_vectors: bool = False,
               default_k: int = DEFAULT_LANCZOS_K, lean: bool = True) -> tuple[int, BlockPlan, str | None]:
    """``(k, plan, note)``: the eigensolver's plan for a ``dim``-dimensional operator within ``budget`` bytes of
    vectors.

    - ``top_k=None`` takes the most of ``default_k`` that fit, at least 1, with a note when that is fewer; above
      :data:`~curvscope.curvature.method.LARGE_MODEL_PARAMS` the default is 1 (a note says so).
    - One eigenvalue per end without vectors (and ``lean``) is planned in two vectors
      (:func:`~curvscope.curvature.matfree.lean.lean_extremes`, ``plan.solver == "lean"``) when the operator is large
      or the budget holds less than the default basis of :func:`~curvscope.curvature.matfree.block.plan_block`.
    - An explicit ``top_k`` that does not fit raises :class:`~curvscope.errors.OptionError` (``max_memory``, naming
      the bytes needed).
    """
    large = dim > LARGE_MODEL_PARAMS
    lean_plan = BlockPlan(1, 0, LEAN_VECTORS * dim * itemsize, solver="lean")

    def leaner(k: int, plan: BlockPlan | None, error: OptionError | None) -> BlockPlan:
        if k != 1 or want_vectors or not lean:
            if plan is None:
                raise error
            return plan
        roomy = plan is not None and plan.max_basis >= default_max_basis(dim, 1, which, plan.block_size)
        if roomy and not large:
            return plan
        if lean_plan.bytes <= budget:
            return lean_plan
        if plan is not None:
            return plan
        raise OptionError("max_memory", f"of {budget:,} bytes is too small: the extreme eigenvalue(s) of a {dim:,}-"
                          f"dimensional operator need at least {lean_plan.bytes:,} bytes "
                          f"({lean_plan.bytes / 2**30:.3g} GiB: {LEAN_VECTORS} vectors)")

    def block(k: int) -> tuple[BlockPlan | None, OptionError | None]:
        try:
            return plan_block(dim, k, which, budget, itemsize, want_vectors=want_vectors), None
        except OptionError as exc:
            return None, exc

    if top_k is not None:
        return top_k, leaner(top_k, *block(top_k)), None
    note = None
    if large and default_k > 1:
        default_k = 1
        note = (f"a large operator ({dim:,} parameters): 1 extreme eigenvalue per end by default, in two vectors "
                "(an explicit top_k asks for more)")
    first_error = None
    for k in range(min(default_k, dim), 0, -1):
        plan, error = block(k)
        first_error = first_error or error
        if plan is None and k > 1:
            continue
        plan = leaner(k, plan, first_error)
        if k != min(default_k, dim):
            note = (f"the memory budget holds the basis for {k} extreme eigenvalue(s) per end of the {dim:,}-"
                    f"dimensional curvature, not {default_k} (a larger max_memory or an explicit top_k asks for more)")
        return k, plan, note
    raise first_error


def vector_budget(problem, max_memory: int | None, dims: list[int], graph_bytes: int | None = None) -> int:
    """Bytes the eigensolver's vectors may take: the memory budget less what one product needs beside them: the
    model's gradient and its double-backward graph, ``graph_bytes`` and one vector of the largest group when that is
    known (:func:`~curvscope.curvature.matfree.stream.plan_stream`), else about three vectors of it."""
    from curvscope.curvature.memory import MemoryPlan

    budget = MemoryPlan.default(problem.device, max_memory).budget
    itemsize = torch.empty(0, dtype=problem.dtype).element_size()
    vector = max(dims) * itemsize
    product = 3 * vector if graph_bytes is None else int(graph_bytes) + vector
    return max(budget - product, 0)


def compute_matfree_spectrum(problem, *, curvature: str = "hessian", groups: str = "all",
                             top_k: int | None = 10, tol: float = 1e-6, max_steps: int | None = None,
                             max_matvecs: int | None = None, max_memory: int | None = None,
                             trace_matvecs: int = 60, density_vectors: int = 4, density_steps: int = 40,
                             eigenvectors: bool = False, include_total: bool = True, seed: int = 0,
                             start: Tensor | None = None, progress: Progress | None = None,
                             process_group: ProcessGroup | None = None, chunk_size: int | None = None,
                             graph_bytes: int | None = None) -> MatfreeResult:
    """Extreme eigenvalues, trace and spectral density of the Hessian or GGN per parameter group (§9).

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        curvature: ``"hessian"`` (``H = d^2 L / d theta^2``, indefinite: top and bottom eigenvalues) or
            ``"ggn"`` (``G``, positive semi-definite: top eigenvalues only).
        groups: ``all`` (the whole model), ``layer`` or ``tensor`` (diagonal blocks, as in
            :func:`~curvscope.curvature.gram.spectrum.compute_spectrum`).
        top_k: eigenvalues wanted at each end (clipped to each group's dimension D_P); ``None``: up to 10, as
            many as the memory budget holds (a note says when fewer).
        tol: relative residual tolerance of the eigensolver (use ``>= 1e-5`` in float32).
        max_steps: cap on the products that build the Krylov basis, per group (the residual checks come on top);
            default: :func:`~curvscope.curvature.matfree.block.block_eigenpairs`' product budget.
        max_matvecs: cap on the eigensolver's products per group, residual checks included (instead of
            ``max_steps``).
        max_memory: the memory budget in bytes (default: a safe share of the device's free memory); the
            eigensolver's basis is sized to fit it beside one product's own memory
            (:func:`vector_budget`, :func:`plan_eigen`).
        trace_matvecs: Hutch++ budget per group; the exact trace when ``>= D_P`` (``stderr`` 0); 0 skips it.
        density_vectors: SLQ start vectors (n_v) for the density of ``groups[0]``; 0 skips it.
        density_steps: Lanczos steps per SLQ vector (m).
        eigenvectors: also return the unit Ritz vectors of ``groups[0].top`` (parameter-shaped).
        include_total: with ``groups != "all"``, prepend the whole model as ``groups[0]``.
        seed: seeds every random vector (start vectors, Hutch++ and SLQ vectors).
        start: ``(D,)`` or ``(D, s)`` start vectors for ``groups[0]``'s eigensolver (a warm start, e.g. the
            previous checkpoint's top eigenvectors flattened in the problem's parameter order).
        progress: ``progress(stage, done, total)`` (:mod:`curvscope.progress`); stages ``"lanczos"`` (products
            of the eigensolver, summed over the groups), ``"trace"`` (products, summed over the groups) and
            ``"density"`` (Lanczos steps).
        process_group: an initialized ``torch.distributed`` group: the call is collective (every rank passes the
            same full problem and arguments); each product is split over the ranks' contiguous slices of the
            batch and summed (bitwise the same on every rank, so every rank runs the same iterations), and every
            rank returns the same result, equal to the single-process one up to rounding.
        chunk_size: stream the batch through every product in chunks of this many samples (one chunk's autograd
            graph in memory; :mod:`curvscope.curvature.matfree.stream`), reporting ``"samples"`` progress; single
            process only. ``None``: one graph of the whole batch, built once per group.
        graph_bytes: the bytes one product's graph takes (:func:`~curvscope.curvature.matfree.stream.plan_stream`):
            the vectors get the rest of the budget (:func:`vector_budget`); default: three vectors' worth.

    Returns:
        :class:`MatfreeResult`; shapes: ``top``/``bottom`` ``(min(k, D_P),)``, density ``(G,)``.

    Raises:
        OptionError: ``max_memory`` too small for even one eigenvalue (or for an explicit ``top_k``), naming the
            bytes needed; bad counts.
    """
    if curvature not in CURVATURES:
        raise CurvscopeError(f"unknown curvature '{curvature}': choose one of {', '.join(CURVATURES)}")
    if groups not in GROUP_MODES:
        raise CurvscopeError(f"groups '{groups}': choose one of {', '.join(GROUP_MODES)}")
    if top_k is not None:
        top_k = _checked("top_k", top_k, 1)
    trace_matvecs = _checked("trace_matvecs", trace_matvecs, 0)
    density_vectors = _checked("density_vectors", density_vectors, 0)
    density_steps = _checked("density_steps", density_steps, 1)
    if max_steps is not None:
        max_steps = _checked("max_steps", max_steps, 1)
    if max_matvecs is not None:
        max_matvecs = _checked("max_matvecs", max_matvecs, 1)
    if not tol > 0:
        raise CurvscopeError(f"tol must be positive, got {tol}")
    progress = or_silent(progress)
    blocks = [(g.name, g.param_names) for g in problem.groups(groups)]
    if include_total and groups != "all":
        blocks = [("all", tuple(problem.params)), *blocks]
    which = "both" if curvature == "hessian" else "largest"
    dims = [sum(problem.params[n].numel() for n in names) for _, names in blocks]
    itemsize = torch.empty(0, dtype=problem.dtype).element_size()
    budget = vector_budget(problem, max_memory, dims, graph_bytes)
    notes: list[str] = []
    plans = []
    for i, d in enumerate(dims):
        k, plan, note = plan_eigen(d, top_k, which, budget, itemsize, want_vectors=eigenvectors and i == 0)
        if note and not notes:
            notes.append(note)
        kt = (2 if which == "both" else 1) * min(k, d)
        cap = (max_matvecs if max_matvecs is not None else
               max_steps + kt if max_steps is not None else max(400, 40 * kt))
        plans.append((k, plan, cap))
    caps = [cap for _, _, cap in plans]
    traces = [min(trace_matvecs, d) for d in dims]
    lanczos_report, trace_report = stage(progress, "lanczos"), stage(progress, "trace")
    from curvscope.curvature.gram.layout import make_layout

    layout = make_layout(problem, process_group)  # sharded: collective, the same problem on every rank
    if chunk_size is not None and process_group is None:
        from curvscope.curvature.matfree.stream import streamed_loss, streamed_operator

        loss_value = streamed_loss(problem, chunk_size)
    else:
        loss_value = layout.loss_value(problem)

    results: list[MatfreeGroup] = []
    vectors: dict[str, Tensor] | None = None
    for i, (name, names) in enumerate(blocks):
        if process_group is None:
            op = (curvature_operator(problem, names, curvature) if chunk_size is None else
                  streamed_operator(problem, names, curvature, chunk_size, progress))
            matvec = op.matvec
        else:
            with layout.stage():  # a rank that cannot build its part ends every rank with its message
                op = curvature_operator(problem, names, curvature, layout.batch_range())

            def matvec(v: Tensor, op=op) -> Tensor:
                with layout.stage():  # a product failing on one rank ends every rank with its message
                    part = op.matvec(v)
                return layout.sum_to_all(part)
        kw = {"dtype": problem.dtype, "device": problem.device}
        k, plan, cap = plans[i]
        if plan.solver == "lean":
            first = None if start is None or i != 0 else start.reshape(op.dim, -1)[:, 0]
            eig = lean_extremes(matvec, op.dim, which=which, tol=tol, max_matvecs=cap, start=first,
                                generator=_generator(seed, i, _EIGEN), progress=_share(lanczos_report, caps, i), **kw)
        else:
            eig = block_eigenpairs(matvec, op.dim, k, which=which, tol=tol, block_size=plan.block_size,
                                   max_basis=plan.max_basis, max_matvecs=cap, start=start if i == 0 else None,
                                   generator=_generator(seed, i, _EIGEN), want_vectors=eigenvectors and i == 0,
                                   progress=_share(lanczos_report, caps, i), **kw)
        lanczos_report(sum(caps[: i + 1]), sum(caps))
        if eigenvectors and i == 0:
            vectors = _parameter_vectors(problem, op, eig.top_vectors)
        # the trace and density stream their vectors within what the budget holds beside kept eigenvectors
        kept = 0 if vectors is None else sum(v.numel() for v in vectors.values()) * itemsize
        room = vectors_within(budget, op.dim, itemsize, reserve=kept)
        trace = None
        if trace_matvecs:
            trace = hutchpp(matvec, op.dim, trace_matvecs, generator=_generator(seed, i, _TRACE), max_vectors=room,
                            progress=_share(trace_report, traces, i), **kw)
            trace_report(sum(traces[: i + 1]), sum(traces))
        density = None
        if i == 0 and density_vectors:
            total = density_vectors * min(density_steps, op.dim)
            density = spectral_density(matvec, op.dim, num_vectors=density_vectors, steps=density_steps,
                                       max_vectors=room, generator=_generator(seed, i, _DENSITY),
                                       progress=progress, **kw)
            progress("density", total, total)
        hessian = curvature == "hessian"
        results.append(MatfreeGroup(
            name=name, param_names=tuple(names), num_params=op.dim,
            top=eig.top, top_residuals=eig.top_residuals,
            bottom=eig.bottom if hessian else None, bottom_residuals=eig.bottom_residuals if hessian else None,
            converged=eig.converged, tol=tol, steps=eig.steps,
            trace=None if trace is None else trace.trace, trace_stderr=None if trace is None else trace.stderr,
            trace_method=None if trace is None else trace.method, density=density,
            negative_mass=_negative_mass(density) if hessian and density is not None else None,
            density_below_zero=_density_below_zero(density) if hessian and density is not None else None,
            matvecs=op.count, certain=min(eig.certain_top, eig.certain_bottom) if hessian else eig.certain_top,
            block_size=eig.block_size, max_basis=eig.max_basis, solver=plan.solver))
        del op  # frees the group's autograd graphs
    return MatfreeResult(groups=results, curvature=curvature, method="lanczos", loss_value=loss_value,
                         matvecs=sum(g.matvecs for g in results), seed=seed, grouping=groups, eigenvectors=vectors,
                         notes=notes)


def _parameter_vectors(problem, op, rows: Tensor) -> dict[str, Tensor]:
    """Unit Ritz vectors ``(k, D_P)`` as name -> ``(k, *shape)`` for every parameter (zeros outside the group)."""
    k = rows.shape[0]
    inside = op.unflatten(rows)
    return {n: inside[n] if n in inside else torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device)
            for n, p in problem.params.items()}
