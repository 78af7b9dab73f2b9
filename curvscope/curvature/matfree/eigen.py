"""Extreme eigenpairs of a symmetric operator by Lanczos, each Ritz value with its true residual (§9).

:func:`extreme_eigenpairs` grows a :class:`~curvscope.curvature.matfree.krylov._Krylov` space one step at a time,
watches the wanted Ritz pairs (:class:`_Ritz`: the top and/or bottom of the tridiagonal's spectrum), checks
their residuals explicitly once the estimates pass, and restarts after an invariant subspace while the newest
block still reaches the wanted extremes. The conventions (operators, randomness, dtype, device, progress) are
those of :mod:`curvscope.curvature.matfree.krylov`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.matfree.adapter import _apply, _resolve
from curvscope.curvature.matfree.krylov import _Krylov, _start_vector, _tridiagonal
from curvscope.curvature.matfree.vectors import _device, _gaussian, _generator, _require_positive
from curvscope.errors import CurvscopeError
from curvscope.progress import Progress, stage

WHICH = ("both", "largest", "smallest")
DEFAULT_K = 6  # default number of eigenvalues at each requested end (SciPy's eigsh uses 6 too)


@dataclass
class EigenResult:
    """The result of :func:`extreme_eigenpairs`.

    Attributes:
        top: ``(k,)`` largest algebraic Ritz values, descending (empty unless ``which`` is largest/both).
        bottom: ``(k,)`` smallest algebraic Ritz values, ascending (empty unless ``which`` is smallest/both).
        top_residuals, bottom_residuals: ``(k,)`` true residual norms ``||A v - theta v||`` of the unit Ritz
            vectors, each computed with one explicit matvec (with ``explicit=False``: Paige's bounds).
        converged: every reported residual is ``<= tol * norm_estimate``.
        norm_estimate: ``max |theta|`` over all Ritz values (a lower bound of ``||A||_2``).
        tol: the relative tolerance used.
        matvecs: operator applications, Lanczos steps plus the explicit residual checks.
        steps: Lanczos steps (the dimension of the Krylov space, restarts included).
        top_vectors, bottom_vectors: ``(k, dim)`` unit Ritz vectors (rows), with ``want_vectors=True``.
    """

    top: Tensor
    bottom: Tensor
    top_residuals: Tensor
    bottom_residuals: Tensor
    converged: bool
    norm_estimate: float
    tol: float
    matvecs: int
    steps: int
    top_vectors: Tensor | None = None
    bottom_vectors: Tensor | None = None


def default_max_steps(dim: int, k: int, which: str = "both") -> int:
    """Default Lanczos step cap of :func:`extreme_eigenpairs`: ``min(dim, max(80, 4 * k_total + 40))`` with
    ``k_total = 2k`` for ``which="both"``, else ``k``. The basis costs ``steps * dim`` numbers of memory."""
    k_total = 2 * k if which == "both" else k
    return min(dim, max(80, 4 * k_total + 40))


@dataclass
class _Ritz:
    """The Ritz pairs of the current tridiagonal and the wanted ones among them (indices into ascending
    ``theta``: ``top`` descending, ``bottom`` ascending, ``index`` their sorted union)."""

    theta: Tensor
    vecs: Tensor
    top: Tensor
    bottom: Tensor
    index: Tensor
    norm: float

    @classmethod
    def of(cls, krylov: _Krylov, k: int, which: str) -> _Ritz:
        theta, vecs = torch.linalg.eigh(_tridiagonal(krylov.alphas, krylov.betas))
        m, k = theta.numel(), min(k, theta.numel())
        top = list(range(m - 1, m - 1 - k, -1)) if which in ("both", "largest") else []
        bottom = list(range(k)) if which in ("both", "smallest") else []
        index = torch.tensor(sorted(set(top + bottom)), dtype=torch.long)
        norm = max(abs(float(theta[0])), abs(float(theta[-1])))  # theta ascending: the largest |theta| is an end
        return cls(theta, vecs, torch.tensor(top, dtype=torch.long), torch.tensor(bottom, dtype=torch.long), index,
                   norm)

    def estimated_residuals(self, krylov: _Krylov) -> Tensor:
        """``beta_next * |y_i[-1]|`` for the wanted pairs (exact up to the dropped tiny betas of restarts)."""
        return krylov.beta_next * self.vecs[-1, self.index].abs()


def _block_contributes(krylov: _Krylov, ritz: _Ritz) -> bool:
    """Whether the block since the last restart holds a Ritz value among the wanted extremes (ties count).

    After an invariant subspace this decides whether to restart: a new block that reaches an extreme may mean
    a repeated eigenvalue (seen once per Krylov block) or a start vector without some eigen-direction."""
    start = krylov.block_start
    block = torch.linalg.eigvalsh(_tridiagonal(krylov.alphas[start:], krylov.betas[start:]))
    top_hit = ritz.top.numel() > 0 and bool((block >= ritz.theta[ritz.top[-1]]).any())
    bottom_hit = ritz.bottom.numel() > 0 and bool((block <= ritz.theta[ritz.bottom[-1]]).any())
    return top_hit or bottom_hit


def _should_check(krylov: _Krylov, ritz: _Ritz, k: int, tol: float, at_end: bool, due: bool) -> bool:
    """Whether to compute the explicit residuals now (and possibly stop)."""
    if at_end:
        return True
    if krylov.m < k:
        return False
    if krylov.invariant:
        return not _block_contributes(krylov, ritz)
    return due and bool((ritz.estimated_residuals(krylov) <= tol * ritz.norm).all())


def _ritz_vectors(krylov: _Krylov, ritz: _Ritz) -> Tensor:
    """The unit Ritz vectors ``(len(index), dim)`` of the wanted pairs."""
    basis = krylov.basis[: krylov.m]
    y = ritz.vecs[:, ritz.index].to(dtype=basis.dtype, device=basis.device)
    vectors = y.T @ basis
    return vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)


def _bounded_residuals(krylov: _Krylov, ritz: _Ritz) -> tuple[Tensor, Tensor]:
    """Unit Ritz vectors and Paige's bounds of their residuals (float64, no product): under full
    reorthogonalization the true residuals to rounding."""
    return _ritz_vectors(krylov, ritz), ritz.estimated_residuals(krylov).to(torch.float64)


def _explicit_residuals(krylov: _Krylov, ritz: _Ritz) -> tuple[Tensor, Tensor]:
    """Unit Ritz vectors ``(len(index), dim)`` and their true residual norms (float64, one matvec each)."""
    vectors = _ritz_vectors(krylov, ritz)
    residuals = torch.empty(ritz.index.numel(), dtype=torch.float64)
    for row, i in enumerate(ritz.index.tolist()):
        r = _apply(krylov.matvec, vectors[row]) - float(ritz.theta[i]) * vectors[row]
        residuals[row] = float(torch.linalg.vector_norm(r))
        krylov.matvecs += 1
    return vectors, residuals


def extreme_eigenpairs(operator: Any, dim: int | None = None, k: int = DEFAULT_K, *, which: str = "both",
                       tol: float = 1e-6, max_steps: int | None = None, start: Tensor | None = None,
                       generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None, want_vectors: bool = False,
                       check_every: int = 5, explicit: bool = True, progress: Progress | None = None) -> EigenResult:
    """The k largest and/or k smallest algebraic eigenvalues of a symmetric operator, by Lanczos.

    The Krylov space grows one step at a time (full reorthogonalization). Once at least k Ritz values exist,
    after every step the residual of each wanted Ritz pair is estimated from the tridiagonal
    (``beta_next * |y_i[-1]|``); when all estimates are ``<= tol * max|theta|``, the true residuals
    ``||A v - theta v||`` are computed with one explicit matvec per Ritz vector (at most once every
    ``check_every`` steps), and the run stops when they pass too. The reported residuals are always these
    explicit ones. When the Krylov space becomes invariant (a repeated eigenvalue, or a start vector without
    some eigen-direction), Lanczos restarts from a random vector orthogonal to the basis as long as the newest
    block reaches the wanted extremes; once ``steps == dim`` the Ritz values are the exact eigenvalues. A
    single Krylov block sees each eigenvalue once, so a repeated extreme eigenvalue of a large operator can be
    reported with a lower multiplicity than it has.

    Args:
        operator: the symmetric ``A`` of shape ``(dim, dim)``: a curvscope ``Operator``, a SciPy
            ``LinearOperator``, a curvlinops operator, a ``(dim, dim)`` tensor, or a function ``v -> A v`` on
            ``(dim,)`` tensors (see :func:`~curvscope.curvature.matfree.adapter.as_matvec`).
        dim: length of the vectors A acts on; required for a plain function, else read from ``operator.shape``.
        k: eigenvalues wanted at each requested end; clipped to ``dim``.
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        tol: relative residual tolerance (relative to ``max |theta|``); in float32 residuals stall near
            ``1e-6``, so use ``tol >= 1e-5`` there.
        max_steps: cap on Lanczos steps, default :func:`default_max_steps`; raised to ``k`` and clipped to
            ``dim``. The basis holds ``max_steps * dim`` numbers.
        start: ``(dim,)`` starting vector; default a Gaussian vector from ``generator``.
        generator: randomness for the start and restart vectors (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the start vector's
            device, else the CPU).
        want_vectors: also return the unit Ritz vectors.
        check_every: minimal number of steps between two explicit residual checks.
        explicit: compute the true residuals with one product per wanted Ritz vector (default). ``False``: stop on
            Paige's bounds ``beta_next |y_i[-1]|`` and report them (the true residuals to rounding, the basis being
            fully reorthogonalized), at any step, with no product more: for repeated solves of one eigenvalue on
            small operators, where a product is a large share of the solve (``curvscope.curvature.sharpness``).
        progress: ``progress(stage, done, total)``; called as ``("lanczos", step, max_steps)`` after every
            Lanczos step (the residual checks are not counted).

    Returns:
        :class:`EigenResult`; ``converged`` is False when ``max_steps`` was reached first.
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, k=k, check_every=check_every)
    if which not in WHICH:
        raise CurvscopeError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if not tol > 0:
        raise CurvscopeError(f"tol must be positive, got {tol}")
    k = min(k, dim)
    cap = default_max_steps(dim, k, which) if max_steps is None else min(dim, max(int(max_steps), k))
    gen = _generator(generator)
    device = _device(device, home, start)
    report = stage(progress, "lanczos")
    krylov = _Krylov(matvec, _start_vector(start, dim, gen, dtype, device), cap)
    last_check, at_end = -check_every, False
    while True:
        if not at_end:
            krylov.step()
            report(krylov.m, cap)
            at_end = krylov.m >= cap
        ritz = _Ritz.of(krylov, k, which)
        if _should_check(krylov, ritz, k, tol, at_end, due=not explicit or krylov.m - last_check >= check_every):
            last_check = krylov.m
            vectors, residuals = (_explicit_residuals if explicit else _bounded_residuals)(krylov, ritz)
            converged = bool((residuals <= tol * ritz.norm).all())
            if converged or at_end:
                return _eigen_result(krylov, ritz, vectors, residuals, converged=converged, tol=tol,
                                     want_vectors=want_vectors)
        if krylov.invariant:  # not at the end: continue in the orthogonal complement (or stop if there is none)
            at_end = not krylov.restart(_gaussian(dim, gen, dtype, device))


def _eigen_result(krylov: _Krylov, ritz: _Ritz, vectors: Tensor, residuals: Tensor, *, converged: bool,
                  tol: float, want_vectors: bool) -> EigenResult:
    dtype, device = krylov.basis.dtype, krylov.basis.device
    position = {i: row for row, i in enumerate(ritz.index.tolist())}

    def pick(wanted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows = torch.tensor([position[i] for i in wanted.tolist()], dtype=torch.long)
        values = ritz.theta[wanted].to(dtype=dtype, device=device)
        return values, residuals[rows].to(dtype=dtype, device=device), vectors[rows.to(device)]

    top, top_residuals, top_vectors = pick(ritz.top)
    bottom, bottom_residuals, bottom_vectors = pick(ritz.bottom)
    return EigenResult(
        top=top, bottom=bottom, top_residuals=top_residuals, bottom_residuals=bottom_residuals,
        converged=converged, norm_estimate=ritz.norm, tol=tol, matvecs=krylov.matvecs, steps=krylov.m,
        top_vectors=top_vectors if want_vectors else None, bottom_vectors=bottom_vectors if want_vectors else None,
    )
