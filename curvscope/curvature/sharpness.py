"""Sharpness: the largest eigenvalue of the Hessian (or GGN) of a Problem, warm-startable (``docs/conventions.md``
§9, §10).

:func:`sharpness` is the one function through which curvature over training (``curvscope track``,
:class:`curvscope.Monitor`) reaches an eigen-solver: the whole model's λ_max, optionally each parameter group's
block λ_max, or the λ_max of an operator derived from the curvature (``wrap``: Adam's P^-1/2 (H + W) P^-1/2, or
-H for the smallest eigenvalue). :func:`top_eigenpair` is the single call into the solver (Lanczos with full
reorthogonalization, :func:`~curvscope.curvature.matfree.eigen.extreme_eigenpairs`), so that another solver
(a block Krylov method) replaces it in one place.

Warm starts: a previous :class:`SharpnessResult` (or a vector) as ``start`` starts Lanczos from its top Ritz
vector plus a random vector of :data:`WARM_NOISE` times its norm. The random part keeps every eigen-direction in
the Krylov space, so a top eigenvector that the previous vector lacked is still found; the result is the same
eigenvalue as from a random start, to the tolerance. Pure functions: no files, no printing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.matfree.eigen import extreme_eigenpairs
from curvscope.curvature.matfree.operators import curvature_operator
from curvscope.errors import CurvscopeError
from curvscope.progress import Progress

DEFAULT_TOL = 1e-4
"""Relative residual tolerance of a sharpness: ``||A v - θ v|| <= tol |θ|``. The eigenvalue's own error is at most
the residual, and usually its square over the spectral gap: far below what a curve over training shows."""
WARM_NOISE = 1e-2
"""Norm of the random vector added to a (unit) warm-start vector."""


@dataclass(repr=False)
class Eigenpair:
    """What :func:`top_eigenpair` returns.

    Attributes:
        value: the largest eigenvalue (the top Ritz value).
        vector: ``(D,)`` its unit Ritz vector (in the operator's dtype and device).
        residual: ``||A v - θ v||`` of that vector, by Paige's bound ``beta_m |y_m|`` (its value to rounding: the
            Lanczos basis is fully reorthogonalized), so no product is spent on checking it.
        products: operator products used (the Lanczos steps).
        steps: Lanczos steps.
        converged: ``residual <= tol * |θ|`` (else the step cap was reached first).
        warm: the run started from a given vector.
    """

    value: float
    vector: Tensor
    residual: float
    products: int
    steps: int
    converged: bool
    warm: bool

    def __repr__(self) -> str:
        return (f"Eigenpair(value={self.value:.6g}, residual={self.residual:.2g}, products={self.products}, "
                f"converged={self.converged}, warm={self.warm})")


@dataclass(repr=False)
class BlockSharpness:
    """The block sharpness of one parameter group: λ_max of the group's diagonal block.

    Attributes:
        name: the group (a layer's module name, or a tensor's name).
        param_names: its parameters.
        lambda_max: the block's largest eigenvalue.
        vector: its unit Ritz vector ``(D_P,)``.
        products, converged, warm: as in :class:`Eigenpair`.
    """

    name: str
    param_names: tuple[str, ...]
    lambda_max: float
    vector: Tensor
    products: int
    converged: bool
    warm: bool

    def __repr__(self) -> str:
        return f"BlockSharpness(name={self.name!r}, lambda_max={self.lambda_max:.6g}, products={self.products})"


@dataclass(repr=False)
class SharpnessResult:
    """What :func:`sharpness` returns.

    Attributes:
        lambda_max: the largest eigenvalue of the (wrapped) curvature operator of the whole model.
        vector: ``(D,)`` its unit Ritz vector: the warm start of the next :func:`sharpness` call.
        residual: the residual of that pair.
        products: operator products of every solve (the whole model and each group).
        steps: Lanczos steps of the whole model's solve.
        converged: every solve reached the tolerance.
        warm: the whole model's solve started from a given vector.
        groups: each group's block sharpness (with ``groups``), else empty.
        curvature: ``"hessian"`` or ``"ggn"``.
    """

    lambda_max: float
    vector: Tensor
    residual: float
    products: int
    steps: int
    converged: bool
    warm: bool
    curvature: str
    groups: list[BlockSharpness] = field(default_factory=list)

    def group(self, name: str) -> BlockSharpness:
        """The block sharpness of group ``name`` (``KeyError`` when there is none)."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def __repr__(self) -> str:
        groups = f", groups={len(self.groups)}" if self.groups else ""
        return (f"SharpnessResult(curvature={self.curvature!r}, lambda_max={self.lambda_max:.6g}, "
                f"products={self.products}, converged={self.converged}, warm={self.warm}{groups})")


def warm_vector(previous: Tensor | None, dim: int, generator: torch.Generator, dtype: torch.dtype,
                device: torch.device) -> Tensor | None:
    """The start vector of a warm start: ``previous`` (unit) plus a Gaussian vector of norm :data:`WARM_NOISE`;
    ``None`` (a cold start) when there is no previous vector, it has another size or is not finite."""
    if previous is None or previous.numel() != dim:
        return None
    v = previous.detach().reshape(-1).to(dtype=dtype, device=device)
    norm = torch.linalg.vector_norm(v)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return None
    noise = torch.randn(dim, generator=generator, device=generator.device, dtype=dtype).to(device)
    return v / norm + WARM_NOISE * noise / torch.linalg.vector_norm(noise)


def top_eigenpair(matvec: Callable[[Tensor], Tensor], dim: int, *, start: Tensor | None = None,
                  tol: float = DEFAULT_TOL, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                  max_steps: int | None = None, progress: Progress | None = None) -> Eigenpair:
    """The largest eigenvalue of a symmetric operator and its unit vector: the one call into the eigen-solver.

    Args:
        matvec: ``v -> A v`` on ``(dim,)`` tensors.
        dim: D.
        start: the first Krylov vector (a warm start), or ``None`` for a random one from ``generator``.
        tol: relative residual tolerance.
        generator: randomness of the start (cold) and restart vectors.
        dtype: of the vectors.
        device: where the vectors live.
        max_steps: cap on Lanczos steps (default: that of the solver).
        progress: ``progress("lanczos", step, cap)``.
    """
    eig = extreme_eigenpairs(matvec, dim, 1, which="largest", tol=tol, max_steps=max_steps, start=start,
                             generator=generator, dtype=dtype, device=device, want_vectors=True,
                             explicit=False, progress=progress)
    return Eigenpair(value=float(eig.top[0]), vector=eig.top_vectors[0], residual=float(eig.top_residuals[0]),
                     products=eig.matvecs, steps=eig.steps, converged=eig.converged, warm=start is not None)


def _group_blocks(problem, groups: str | Sequence[Any] | None) -> list[tuple[str, tuple[str, ...]]]:
    if groups is None:
        return []
    if isinstance(groups, str):
        if groups == "all":
            return []
        return [(g.name, tuple(g.param_names)) for g in problem.groups(groups)]
    return [(g.name, tuple(g.param_names)) for g in groups]


def _starts(start: SharpnessResult | Tensor | None) -> tuple[Tensor | None, Mapping[str, Tensor]]:
    if start is None:
        return None, {}
    if isinstance(start, SharpnessResult):
        return start.vector, {g.name: g.vector for g in start.groups}
    if isinstance(start, Tensor):
        return start, {}
    raise CurvscopeError(f"start must be a SharpnessResult, a tensor or None, got {type(start).__name__}")


def sharpness(problem, curvature: str = "hessian", *, start: SharpnessResult | Tensor | None = None,
              tol: float = DEFAULT_TOL, groups: str | Sequence[Any] | None = None,
              wrap: Callable[[Any], Any] | None = None, seed: int = 0, max_steps: int | None = None,
              progress: Progress | None = None, operator: Any = None) -> SharpnessResult:
    """λ_max of the Hessian (or GGN) of ``problem``'s batch loss, by Lanczos; optionally each group's block λ_max.

    Args:
        problem: the :class:`~curvscope.problem.Problem` (its parameters are the point measured).
        curvature: ``"hessian"`` or ``"ggn"``.
        start: a previous result (its vector, and its groups' vectors by name) or a ``(D,)`` vector to warm-start
            from; ``None``: random starts. A vector of another size is ignored (a cold start).
        tol: relative residual tolerance of every solve (``>= 1e-5`` in float32).
        groups: ``None``/``"all"`` (the whole model only), ``"layer"``, ``"tensor"``, or a list of
            :class:`~curvscope.problem.ParamGroup`: also each group's block sharpness (the largest eigenvalue of
            its diagonal block; ``wrap`` is not applied to the blocks).
        wrap: maps the whole model's curvature operator to the operator whose largest eigenvalue is wanted (an
            object with ``matvec`` and ``dim``): e.g. ``lambda op: compared_operator(op, state, info, shapes)``
            for Adam's preconditioned sharpness, or a negation for the smallest eigenvalue.
        seed: seeds the random start and restart vectors (each solve its own generator).
        max_steps: cap on Lanczos steps per solve.
        progress: ``progress("lanczos", step, cap)`` of each solve in turn.
        operator: the whole model's ``curvature`` operator, already built (its gradient graph shared with other
            solves at the same parameters); ``None``: built here. The groups' blocks are always built here.

    Returns:
        :class:`SharpnessResult`.
    """
    if operator is not None and (operator.kind != curvature or operator.names != tuple(problem.params)):
        raise CurvscopeError(f"operator: a {operator.kind} operator of {len(operator.names)} tensors, not the whole "
                             f"model's {curvature}")
    whole, group_starts = _starts(start)
    blocks = [(None, tuple(problem.params))] + _group_blocks(problem, groups)
    results: list[tuple[Eigenpair, str | None, tuple[str, ...]]] = []
    for index, (name, names) in enumerate(blocks):
        op = operator if (name is None and operator is not None) else curvature_operator(problem, names, curvature)
        target = wrap(op) if (wrap is not None and name is None) else op
        if target is None:
            raise CurvscopeError("wrap returned no operator")
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7 * index + 5)
        previous = whole if name is None else group_starts.get(name)
        first = warm_vector(previous, target.dim, generator, problem.dtype, problem.device)
        pair = top_eigenpair(target.matvec, target.dim, start=first, tol=tol, generator=generator,
                             dtype=problem.dtype, device=problem.device, max_steps=max_steps, progress=progress)
        results.append((pair, name, names))
        del op, target  # frees the autograd graphs of this operator
    top = results[0][0]
    blocks_out = [BlockSharpness(name=name, param_names=names, lambda_max=pair.value, vector=pair.vector,
                                 products=pair.products, converged=pair.converged, warm=pair.warm)
                  for pair, name, names in results[1:]]
    return SharpnessResult(lambda_max=top.value, vector=top.vector, residual=top.residual,
                           products=sum(p.products for p, _, _ in results), steps=top.steps,
                           converged=all(p.converged for p, _, _ in results), warm=top.warm, curvature=curvature,
                           groups=blocks_out)


class Negated:
    """``-A`` for an operator ``A`` with ``matvec`` and ``dim``: its largest eigenvalue is ``-λ_min(A)``."""

    def __init__(self, operator: Any) -> None:
        self.operator = operator
        self.dim = operator.dim

    def matvec(self, v: Tensor) -> Tensor:
        """``-A v``."""
        return -self.operator.matvec(v)
