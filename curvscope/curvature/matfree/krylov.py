"""The Lanczos core of the matrix-free wing (``docs/conventions.md`` section 9).

:class:`_Krylov` grows a Krylov space one step at a time (with full reorthogonalization by default) and restarts
after an invariant subspace; :func:`lanczos` runs it for a fixed number of steps and returns a
:class:`LanczosRun`. :mod:`~curvscope.curvature.matfree.eigen` (extreme eigenpairs) and
:mod:`~curvscope.curvature.matfree.density` (SLQ) drive :class:`_Krylov` step by step.

Conventions shared by every estimator of the package:

- the operator is anything :func:`~curvscope.curvature.matfree.adapter.as_matvec` accepts: a curvscope
  ``Operator``, a SciPy ``LinearOperator``, a curvlinops operator, a dense ``(D, D)`` tensor, or a function
  ``v -> A v`` on flat ``(dim,)`` tensors (then with ``dim``). The product is called with a flat ``(dim,)``
  tensor of ``dtype`` on ``device``; its result may have any shape with ``dim`` elements and any floating dtype
  (it is flattened and cast to ``dtype`` on ``device``).
- All randomness comes from ``generator`` (default: a CPU generator seeded with 0). Random vectors are drawn on
  the generator's device and then moved to ``device``, so a seed gives the same vectors on every device.
- Vectors live in ``dtype`` (default float64) on ``device`` (default: the operator's device when it has one,
  else the CPU). The small ``m x m`` tridiagonal eigenproblems are solved on the CPU in float64; their results
  are returned in ``dtype`` on ``device``.
- ``progress(stage, done, total)`` (the protocol of :mod:`curvscope.progress`), when given, is called as work
  advances, with stage ``"lanczos"``, ``"trace"`` or ``"density"``; ``done`` ends equal to ``total``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.matfree.adapter import MatVec, _apply, _resolve
from curvscope.curvature.matfree.vectors import _device, _gaussian, _generator, _require_positive, _unit
from curvscope.errors import CurvscopeError
from curvscope.progress import Progress, stage

DEFAULT_STEPS = 60  # default number of Lanczos steps of lanczos() and spectral_density()


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """The Lanczos tridiagonal ``(m, m)`` in float64 on the CPU."""
    m = len(alphas)
    t = torch.zeros(m, m, dtype=torch.float64)
    flat = t.view(-1)  # the diagonals as strided slices of the flat matrix: three copies, no temporaries
    flat[:: m + 1] = torch.tensor(alphas, dtype=torch.float64)
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        flat[1 :: m + 1] = off
        flat[m :: m + 1] = off
    return t



@dataclass
class LanczosRun:
    """The result of :func:`lanczos`: ``A Q^T ~= Q^T T + beta_next q_next e_m^T`` with ``T = tridiag(betas,
    alphas, betas)``.

    Attributes:
        alphas: ``(m,)`` diagonal of the tridiagonal T.
        betas: ``(m-1,)`` off-diagonal of T.
        Q: ``(m, dim)`` orthonormal Lanczos basis (rows), or ``None`` with ``keep_basis=False``.
        matvecs: number of operator applications.
        beta_next: norm of the residual after the last step; the Ritz pair ``(theta_i, Q^T y_i)`` has residual
            norm ``beta_next * |y_i[-1]|``.
        invariant: True when the run stopped early because the Krylov space became invariant (or spans
            everything): then the Ritz values are eigenvalues of A.
    """

    alphas: Tensor
    betas: Tensor
    Q: Tensor | None
    matvecs: int
    beta_next: float
    invariant: bool

    @property
    def steps(self) -> int:
        """m: the number of Lanczos steps taken (the size of T)."""
        return int(self.alphas.numel())

    def tridiagonal(self) -> Tensor:
        """T, ``(m, m)``, in float64 on the CPU."""
        return _tridiagonal(self.alphas.tolist(), self.betas.tolist())

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Eigen-decomposition of T (float64, CPU): Ritz values ``(m,)`` ascending and T's eigenvectors
        ``(m, m)`` (columns)."""
        return torch.linalg.eigh(self.tridiagonal())


class _Krylov:
    """A Lanczos process that grows one step at a time and can restart after an invariant subspace.

    The basis is preallocated with ``capacity`` rows (two rows when neither reorthogonalizing nor keeping it).
    """

    def __init__(self, matvec: MatVec, start: Tensor, capacity: int, *, reorthogonalize: bool = True,
                 keep_basis: bool = True) -> None:
        self.matvec = matvec
        self.dim = start.numel()
        self.reorthogonalize = reorthogonalize
        self.full_basis = reorthogonalize or keep_basis
        rows = capacity if self.full_basis else 2
        self.basis = torch.empty(rows, self.dim, dtype=start.dtype, device=start.device)
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.beta_next = 0.0
        self.next_q: Tensor | None = _unit(start)
        self.norm_estimate = 0.0
        self.matvecs = 0
        self.block_start = 0  # index of the first step of the current block (after the last restart)
        self.tiny = torch.finfo(start.dtype).eps ** 0.75

    @property
    def m(self) -> int:
        return len(self.alphas)

    @property
    def invariant(self) -> bool:
        return self.next_q is None

    def _row(self, j: int) -> Tensor:
        return self.basis[j if self.full_basis else j % 2]

    def _orthogonalize(self, w: Tensor, rows: int) -> tuple[Tensor, float]:
        """Classical Gram-Schmidt of ``w`` against the first ``rows`` basis vectors, repeated once when the
        first pass cancelled more than ``1 - 1/sqrt(2)`` of ``w``'s norm (Kahan's "twice is enough": without
        such cancellation one pass is orthogonal to working precision); returns the new ``w`` and the sum of
        its coefficients on the last basis vector."""
        basis = self.basis[:rows]
        before = float(torch.linalg.vector_norm(w))
        h1 = basis @ w
        w = w - h1 @ basis
        if float(torch.linalg.vector_norm(w)) > before / math.sqrt(2.0):
            return w, float(h1[-1])
        h2 = basis @ w
        return w - h2 @ basis, float(h1[-1] + h2[-1])

    def step(self) -> None:
        """One Lanczos step from ``next_q`` (which must exist)."""
        j = self.m
        if j > 0:
            self.betas.append(self.beta_next)
        q = self.next_q
        self._row(j).copy_(q)
        w = _apply(self.matvec, q)
        self.matvecs += 1
        if self.reorthogonalize:
            w, alpha = self._orthogonalize(w, j + 1)
        else:
            alpha = float(q @ w)
            w = w - alpha * q
            if j > self.block_start:
                w = w - self.betas[-1] * self._row(j - 1)
        beta = float(torch.linalg.vector_norm(w))
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise CurvscopeError(f"matvec returned non-finite values at Lanczos step {j + 1}")
        previous = self.betas[-1] if j > 0 else 0.0
        self.norm_estimate = max(self.norm_estimate, abs(alpha) + beta + previous)
        self.alphas.append(alpha)
        self.beta_next = beta
        breakdown = beta <= self.tiny * self.norm_estimate or self.m >= self.dim
        self.next_q = None if breakdown else w / beta

    def restart(self, v: Tensor) -> bool:
        """Continue after an invariant subspace from ``v`` orthogonalized against the basis; the tridiagonal
        gets a 0 off-diagonal. Returns False (and changes nothing) when ``v`` lies in the span of the basis."""
        norm_v = float(torch.linalg.vector_norm(v))
        w, _ = self._orthogonalize(v, self.m)
        norm_w = float(torch.linalg.vector_norm(w))
        if self.m >= self.dim or not norm_w > self.tiny * norm_v:
            return False
        self.next_q = _unit(w)
        self.beta_next = 0.0
        self.block_start = self.m
        return True

    def run(self, keep_basis: bool) -> LanczosRun:
        dtype, device = self.basis.dtype, self.basis.device
        return LanczosRun(
            alphas=torch.tensor(self.alphas, dtype=dtype, device=device),
            betas=torch.tensor(self.betas, dtype=dtype, device=device),
            Q=self.basis[: self.m].clone() if keep_basis and self.full_basis else None,
            matvecs=self.matvecs, beta_next=self.beta_next, invariant=self.invariant,
        )


def _start_vector(start: Tensor | None, dim: int, generator: torch.Generator | None, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    if start is None:
        return _gaussian(dim, _generator(generator), dtype, device)
    if start.numel() != dim:
        raise CurvscopeError(f"start vector has {start.numel()} elements, the operator acts on {dim}")
    v = start.reshape(-1).to(dtype=dtype, device=device)
    norm = float(torch.linalg.vector_norm(v))
    if not (math.isfinite(norm) and norm > 0):
        raise CurvscopeError("start vector must be finite and nonzero")
    return v


def lanczos(operator: Any, dim: int | None = None, steps: int = DEFAULT_STEPS, *, start: Tensor | None = None,
            generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None, reorthogonalize: bool = True, keep_basis: bool = True,
            progress: Progress | None = None) -> LanczosRun:
    """Lanczos tridiagonalization of a symmetric operator.

    With ``reorthogonalize=True`` every new vector is orthogonalized twice (classical Gram-Schmidt) against all
    previous basis vectors, which keeps the basis orthonormal to rounding. The run stops early when the Krylov
    space becomes invariant: the new residual norm is below ``eps(dtype)**0.75`` times a running estimate of
    ``||T||`` (then the Ritz values are eigenvalues of A).

    Args:
        operator: the symmetric ``A`` of shape ``(dim, dim)``: a curvscope ``Operator``, a SciPy
            ``LinearOperator``, a curvlinops operator, a ``(dim, dim)`` tensor, or a function ``v -> A v`` on
            ``(dim,)`` tensors (see :func:`~curvscope.curvature.matfree.adapter.as_matvec`).
        dim: length of the vectors A acts on; required for a plain function, else read from ``operator.shape``.
        steps: maximal number of Lanczos steps (matvecs); clipped to ``dim``.
        start: ``(dim,)`` starting vector (normalized here); default a Gaussian vector from ``generator``.
        generator: source of the default starting vector (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the start vector's
            device, else the CPU).
        reorthogonalize: full reorthogonalization (default); without it only the three-term recurrence is used
            and orthogonality is lost once Ritz values converge.
        keep_basis: return the basis ``Q``. With ``reorthogonalize=True`` the basis is held during the run in
            any case; ``keep_basis=False`` only avoids returning (and copying) it.
        progress: ``progress(stage, done, total)``; called as ``("lanczos", step, steps)`` after every step
            (and once with ``done == steps`` when the run stops early).

    Returns:
        :class:`LanczosRun` with ``alphas (m,)``, ``betas (m-1,)``, ``Q (m, dim)`` and ``matvecs == m``.
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, steps=steps)
    device = _device(device, home, start)
    steps = min(steps, dim)
    report = stage(progress, "lanczos")
    krylov = _Krylov(matvec, _start_vector(start, dim, generator, dtype, device), steps,
                     reorthogonalize=reorthogonalize, keep_basis=keep_basis)
    while krylov.m < steps and not krylov.invariant:
        krylov.step()
        report(krylov.m, steps)
    if krylov.m < steps:
        report(steps, steps)
    return krylov.run(keep_basis)
