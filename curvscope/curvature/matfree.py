"""Matrix-free estimators on any symmetric linear operator (``docs/conventions.md`` section 9).

The operator is a function ``matvec(v) -> A v`` on flat vectors of length ``dim``: a Hessian-vector product by
double backward, a GGN-vector product, or a dense matrix in tests. Nothing here knows about models.

- :func:`lanczos`: Lanczos tridiagonalization with full reorthogonalization.
- :func:`extreme_eigenpairs`: the largest and/or smallest algebraic eigenvalues, each with its true residual.
- :func:`hutchpp` (Meyer, Musco, Musco, Woodruff 2021) and :func:`hutchinson`: trace estimates with a standard
  error.
- :func:`spectral_density`: stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017).

Conventions shared by every function:

- ``matvec`` is called with a flat ``(dim,)`` tensor of ``dtype`` on ``device``; its result may have any shape
  with ``dim`` elements and any floating dtype (it is flattened and cast to ``dtype`` on ``device``).
- All randomness comes from ``generator`` (default: a CPU generator seeded with 0). Random vectors are drawn on
  the generator's device and then moved to ``device``, so a seed gives the same vectors on every device.
- Vectors live in ``dtype`` (default float64) on ``device`` (default CPU). The small ``m x m`` tridiagonal
  eigenproblems are solved on the CPU in float64; their results are returned in ``dtype`` on ``device``.
- ``progress(stage, done, total)`` (the protocol of :mod:`curvscope.progress`), when given, is called as work
  advances, with stage ``"lanczos"``, ``"trace"`` or ``"density"``; ``done`` ends equal to ``total``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError
from curvscope.progress import Progress

MatVec = Callable[[Tensor], Tensor]

WHICH = ("both", "largest", "smallest")
DISTRIBUTIONS = ("rademacher", "gaussian")
DEFAULT_SIGMA_FRACTION = 0.01  # default SLQ kernel width, as a fraction of the spread of the Ritz values
GRID_PAD_SIGMAS = 5.0  # the default SLQ grid extends this many sigmas beyond the extreme Ritz values


# -- small helpers ---------------------------------------------------------------------------------------

def _generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise CurvscopeError(f"{name} must be a positive integer, got {value}")


def _rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(dim,)`` vector of independent +-1 entries."""
    z = torch.randint(0, 2, (dim,), generator=generator, device=generator.device)
    return z.to(device=device, dtype=dtype).mul_(2).sub_(1)


def _gaussian(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(dim,)`` standard normal vector."""
    return torch.randn(dim, generator=generator, device=generator.device, dtype=dtype).to(device)


def _tick(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v)


def _apply(matvec: MatVec, v: Tensor) -> Tensor:
    """``A v`` as a flat tensor of ``v``'s dtype and device, with a clear error on a wrong shape."""
    out = matvec(v)
    if not isinstance(out, Tensor) or out.numel() != v.numel():
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CurvscopeError(f"matvec returned {shape} for a vector of {v.numel()} elements")
    return out.reshape(-1).to(dtype=v.dtype, device=v.device)


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """The Lanczos tridiagonal ``(m, m)`` in float64 on the CPU."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


# -- Lanczos ---------------------------------------------------------------------------------------------

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


def lanczos(matvec: MatVec, dim: int, steps: int, *, start: Tensor | None = None,
            generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None, reorthogonalize: bool = True, keep_basis: bool = True,
            progress: Progress | None = None) -> LanczosRun:
    """Lanczos tridiagonalization of a symmetric operator.

    With ``reorthogonalize=True`` every new vector is orthogonalized twice (classical Gram-Schmidt) against all
    previous basis vectors, which keeps the basis orthonormal to rounding. The run stops early when the Krylov
    space becomes invariant: the new residual norm is below ``eps(dtype)**0.75`` times a running estimate of
    ``||T||`` (then the Ritz values are eigenvalues of A).

    Args:
        matvec: ``v -> A v`` on ``(dim,)`` tensors; A must be symmetric.
        dim: length of the vectors A acts on.
        steps: maximal number of Lanczos steps (matvecs); clipped to ``dim``.
        start: ``(dim,)`` starting vector (normalized here); default a Gaussian vector from ``generator``.
        generator: source of the default starting vector (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the start vector's device, else the CPU).
        reorthogonalize: full reorthogonalization (default); without it only the three-term recurrence is used
            and orthogonality is lost once Ritz values converge.
        keep_basis: return the basis ``Q``. With ``reorthogonalize=True`` the basis is held during the run in
            any case; ``keep_basis=False`` only avoids returning (and copying) it.
        progress: called with ``(step, steps)`` after every step.

    Returns:
        :class:`LanczosRun` with ``alphas (m,)``, ``betas (m-1,)``, ``Q (m, dim)`` and ``matvecs == m``.
    """
    _require_positive(dim=dim, steps=steps)
    device = _device(device if device is not None or start is None else start.device)
    steps = min(steps, dim)
    krylov = _Krylov(matvec, _start_vector(start, dim, generator, dtype, device), steps,
                     reorthogonalize=reorthogonalize, keep_basis=keep_basis)
    while krylov.m < steps and not krylov.invariant:
        krylov.step()
        _tick(progress, "lanczos", krylov.m, steps)
    if krylov.m < steps:
        _tick(progress, "lanczos", steps, steps)
    return krylov.run(keep_basis)


# -- extreme eigenpairs ----------------------------------------------------------------------------------

@dataclass
class EigenResult:
    """The result of :func:`extreme_eigenpairs`.

    Attributes:
        top: ``(k,)`` largest algebraic Ritz values, descending (empty unless ``which`` is largest/both).
        bottom: ``(k,)`` smallest algebraic Ritz values, ascending (empty unless ``which`` is smallest/both).
        top_residuals, bottom_residuals: ``(k,)`` true residual norms ``||A v - theta v||`` of the unit Ritz
            vectors, each computed with one explicit matvec.
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
        top = torch.arange(m - 1, m - 1 - k, -1) if which in ("both", "largest") else torch.arange(0)
        bottom = torch.arange(k) if which in ("both", "smallest") else torch.arange(0)
        return cls(theta, vecs, top, bottom, torch.cat([top, bottom]).unique(), float(theta.abs().max()))

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


def _explicit_residuals(krylov: _Krylov, ritz: _Ritz) -> tuple[Tensor, Tensor]:
    """Unit Ritz vectors ``(len(index), dim)`` and their true residual norms (float64, one matvec each)."""
    basis = krylov.basis[: krylov.m]
    y = ritz.vecs[:, ritz.index].to(dtype=basis.dtype, device=basis.device)
    vectors = y.T @ basis
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    residuals = torch.empty(ritz.index.numel(), dtype=torch.float64)
    for row, i in enumerate(ritz.index.tolist()):
        r = _apply(krylov.matvec, vectors[row]) - float(ritz.theta[i]) * vectors[row]
        residuals[row] = float(torch.linalg.vector_norm(r))
        krylov.matvecs += 1
    return vectors, residuals


def extreme_eigenpairs(matvec: MatVec, dim: int, k: int, *, which: str = "both", tol: float = 1e-6,
                       max_steps: int | None = None, start: Tensor | None = None,
                       generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None, want_vectors: bool = False,
                       check_every: int = 5, progress: Progress | None = None) -> EigenResult:
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
        matvec: ``v -> A v`` on ``(dim,)`` tensors; A must be symmetric.
        dim: length of the vectors A acts on.
        k: eigenvalues wanted at each requested end; clipped to ``dim``.
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        tol: relative residual tolerance (relative to ``max |theta|``); in float32 residuals stall near
            ``1e-6``, so use ``tol >= 1e-5`` there.
        max_steps: cap on Lanczos steps, default :func:`default_max_steps`; raised to ``k`` and clipped to
            ``dim``. The basis holds ``max_steps * dim`` numbers.
        start: ``(dim,)`` starting vector; default a Gaussian vector from ``generator``.
        generator: randomness for the start and restart vectors (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the start vector's device, else the CPU).
        want_vectors: also return the unit Ritz vectors.
        check_every: minimal number of steps between two explicit residual checks.
        progress: called with ``(step, max_steps)`` after every Lanczos step.

    Returns:
        :class:`EigenResult`; ``converged`` is False when ``max_steps`` was reached first.
    """
    _require_positive(dim=dim, k=k, check_every=check_every)
    if which not in WHICH:
        raise CurvscopeError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if not tol > 0:
        raise CurvscopeError(f"tol must be positive, got {tol}")
    k = min(k, dim)
    cap = default_max_steps(dim, k, which) if max_steps is None else min(dim, max(int(max_steps), k))
    gen = _generator(generator)
    device = _device(device if device is not None or start is None else start.device)
    krylov = _Krylov(matvec, _start_vector(start, dim, gen, dtype, device), cap)
    last_check, at_end = -check_every, False
    while True:
        if not at_end:
            krylov.step()
            _tick(progress, "lanczos", krylov.m, cap)
            at_end = krylov.m >= cap
        ritz = _Ritz.of(krylov, k, which)
        if _should_check(krylov, ritz, k, tol, at_end, due=krylov.m - last_check >= check_every):
            last_check = krylov.m
            vectors, residuals = _explicit_residuals(krylov, ritz)
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


# -- trace -----------------------------------------------------------------------------------------------

@dataclass
class TraceEstimate:
    """A trace estimate.

    Attributes:
        trace: the estimate of ``tr(A)``.
        stderr: standard error of its random part (sample standard deviation of the Hutchinson samples over
            ``sqrt(#samples)``); 0.0 when exact, NaN with a single sample.
        matvecs: operator applications used.
        method: ``"hutch++"``, ``"hutchinson"`` or ``"exact"``.
    """

    trace: float
    stderr: float
    matvecs: int
    method: str

    @property
    def exact(self) -> bool:
        """The trace is exact (from the unit vectors), not estimated."""
        return self.method == "exact"


def _mean_and_stderr(samples: list[float]) -> tuple[float, float]:
    x = torch.tensor(samples, dtype=torch.float64)
    stderr = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
    return float(x.mean()), stderr


def exact_trace(matvec: MatVec, dim: int, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None, progress: Progress | None = None) -> TraceEstimate:
    """The exact trace ``sum_i e_i^T A e_i`` from the ``dim`` unit vectors.

    Args:
        matvec: ``v -> A v`` on ``(dim,)`` tensors.
        dim: length of the vectors A acts on.
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the CPU).
        progress: called with ``(matvecs done, dim)`` after every matvec.

    Returns:
        :class:`TraceEstimate` with ``stderr == 0.0``, ``matvecs == dim`` and ``method == "exact"``.
    """
    _require_positive(dim=dim)
    device = _device(device)
    total = 0.0
    for i in range(dim):
        e = torch.zeros(dim, dtype=dtype, device=device)
        e[i] = 1.0
        total += float(_apply(matvec, e)[i])
        _tick(progress, "trace", i + 1, dim)
    return TraceEstimate(trace=total, stderr=0.0, matvecs=dim, method="exact")


def hutchinson(matvec: MatVec, dim: int, num_matvecs: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
               progress: Progress | None = None) -> TraceEstimate:
    """Hutchinson's trace estimator ``(1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``.

    Args:
        matvec: ``v -> A v`` on ``(dim,)`` tensors.
        dim: length of the vectors A acts on.
        num_matvecs: number of random vectors m. With ``m >= dim`` the trace is computed exactly from the
            ``dim`` unit vectors instead (``stderr`` 0.0, ``matvecs == dim``).
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the CPU).
        progress: called with ``(matvecs done, total)`` after every matvec.

    Returns:
        :class:`TraceEstimate` (``stderr`` NaN when ``m == 1``).
    """
    _require_positive(dim=dim, num_matvecs=num_matvecs)
    if num_matvecs >= dim:
        return exact_trace(matvec, dim, dtype=dtype, device=device, progress=progress)
    gen, device = _generator(generator), _device(device)
    samples = []
    for i in range(num_matvecs):
        z = _rademacher(dim, gen, dtype, device)
        samples.append(float(z @ _apply(matvec, z)))
        _tick(progress, "trace", i + 1, num_matvecs)
    trace, stderr = _mean_and_stderr(samples)
    return TraceEstimate(trace=trace, stderr=stderr, matvecs=num_matvecs, method="hutchinson")


def hutchpp(matvec: MatVec, dim: int, num_matvecs: int, *, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
            progress: Progress | None = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with Rademacher vectors.

    With ``m = num_matvecs`` and ``s = m // 3``: a sketch ``A S`` of ``s`` Rademacher vectors (s matvecs), its
    orthonormal basis ``Q = qr(A S)``, the exact ``tr(Q^T A Q)`` (s matvecs), and Hutchinson on
    ``(I - Q Q^T) A (I - Q Q^T)`` with the remaining ``m - 2s`` Rademacher vectors. The estimate is unbiased;
    ``stderr`` is the standard error of the Hutchinson part, which carries all its randomness given Q. For
    ``m < 3`` this is plain :func:`hutchinson`; for ``m >= dim`` the exact trace from ``dim`` unit vectors.

    Args:
        matvec: ``v -> A v`` on ``(dim,)`` tensors; A must be symmetric.
        dim: length of the vectors A acts on.
        num_matvecs: total budget of matvecs m (all of it is used: ``result.matvecs == min(m, dim)``).
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the CPU). Memory: two ``(dim, s)`` matrices.
        progress: called with ``(matvecs done, total)`` after every matvec.

    Returns:
        :class:`TraceEstimate` (``stderr`` NaN when a single Hutchinson vector is left, i.e. ``m == 3``).
    """
    _require_positive(dim=dim, num_matvecs=num_matvecs)
    if num_matvecs >= dim:
        return exact_trace(matvec, dim, dtype=dtype, device=device, progress=progress)
    if num_matvecs < 3:
        return hutchinson(matvec, dim, num_matvecs, generator=generator, dtype=dtype, device=device,
                          progress=progress)
    gen, device = _generator(generator), _device(device)
    s, total = num_matvecs // 3, num_matvecs
    sketch = torch.empty(dim, s, dtype=dtype, device=device)
    for i in range(s):
        sketch[:, i] = _apply(matvec, _rademacher(dim, gen, dtype, device))
        _tick(progress, "trace", i + 1, total)
    q, _ = torch.linalg.qr(sketch)
    del sketch
    low_rank = 0.0
    for i in range(s):
        low_rank += float(q[:, i] @ _apply(matvec, q[:, i].contiguous()))
        _tick(progress, "trace", s + i + 1, total)
    samples = []
    for i in range(total - 2 * s):
        z = _rademacher(dim, gen, dtype, device)
        z = z - q @ (q.T @ z)
        samples.append(float(z @ _apply(matvec, z)))
        _tick(progress, "trace", 2 * s + i + 1, total)
    rest, stderr = _mean_and_stderr(samples)
    return TraceEstimate(trace=low_rank + rest, stderr=stderr, matvecs=total, method="hutch++")


# -- spectral density ------------------------------------------------------------------------------------

@dataclass
class Density:
    """A spectral density from stochastic Lanczos quadrature.

    ``values`` is ``phi(lambda) = (1/n_v) sum_v sum_i tau_vi N(lambda; theta_vi, sigma^2)``, a probability
    density (multiply by ``dim`` for an eigenvalue count density).

    Attributes:
        grid: ``(G,)`` evaluation points, ascending.
        values: ``(G,)`` density on the grid; integrates to ~1 (trapezoid) when the grid covers
            ``[min theta - 4 sigma, max theta + 4 sigma]`` with a spacing below ~sigma.
        nodes: ``(n_v, m)`` Ritz values theta of each start vector; a run that stopped early on an invariant
            subspace is padded with its largest Ritz value at weight 0.
        weights: ``(n_v, m)`` quadrature weights tau (squared first components of T's eigenvectors); each row
            sums to 1.
        sigma: the Gaussian kernel's standard deviation.
        dim: dimension of the operator.
        matvecs: operator applications.
    """

    grid: Tensor
    values: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    dim: int
    matvecs: int

    def vector_moments(self, p: int) -> Tensor:
        """``(n_v,)``: ``sum_i tau_vi theta_vi^p = v^T A^p v`` (exact for ``p <= 2m - 1``)."""
        return (self.weights * self.nodes**p).sum(dim=1)

    def moment(self, p: int) -> float:
        """Estimate of ``(1/dim) tr(A^p)``: the mean of :meth:`vector_moments` (unbiased for ``p <= 2m-1``)."""
        return float(self.vector_moments(p).mean())

    def moment_stderr(self, p: int) -> float:
        """Standard error of :meth:`moment` over the start vectors (NaN with a single vector)."""
        x = self.vector_moments(p).to(torch.float64)
        return float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else math.nan


def _quadrature(krylov: _Krylov, steps: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights ``(steps,)`` of one Lanczos run, padded with weight-0 copies of the largest node."""
    theta, vecs = torch.linalg.eigh(_tridiagonal(krylov.alphas, krylov.betas))
    tau = vecs[0] ** 2
    pad = steps - theta.numel()
    if pad:
        theta = torch.cat([theta, theta[-1].expand(pad)])
        tau = torch.cat([tau, torch.zeros(pad, dtype=tau.dtype)])
    return theta, tau


def default_sigma(nodes: Tensor) -> float:
    """The default SLQ kernel width: 1% of the spread of the Ritz values (of ``max |theta|``, or 1.0, when they
    all coincide)."""
    lo, hi = float(nodes.min()), float(nodes.max())
    spread = hi - lo if hi > lo else max(abs(lo), abs(hi))
    return DEFAULT_SIGMA_FRACTION * (spread if spread > 0 else 1.0)


def _default_grid(nodes: Tensor, sigma: float, num_grid: int) -> Tensor:
    pad = GRID_PAD_SIGMAS * sigma
    lo, hi = float(nodes.min()) - pad, float(nodes.max()) + pad
    return torch.linspace(lo, hi, num_grid, dtype=nodes.dtype, device=nodes.device)


def gaussian_density(grid: Tensor, nodes: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """``(G,)``: ``(1/n_v) sum_v sum_i w_vi N(grid; nodes_vi, sigma^2)`` for nodes/weights ``(n_v, m)``."""
    n_v = nodes.shape[0]
    diff = grid[:, None] - nodes.reshape(1, -1)
    kernel = torch.exp(-0.5 * (diff / sigma) ** 2)
    return kernel @ weights.reshape(-1) / (n_v * sigma * math.sqrt(2 * math.pi))


def spectral_density(matvec: MatVec, dim: int, *, num_vectors: int = 8, steps: int = 60,
                     grid: Tensor | None = None, num_grid: int = 400, sigma: float | None = None,
                     distribution: str = "rademacher", reorthogonalize: bool = True,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None, progress: Progress | None = None) -> Density:
    """Spectral density by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; PyHessian).

    For each of ``num_vectors`` random unit vectors v, ``steps`` Lanczos steps give Ritz values theta_i and
    weights tau_i (squared first components of T's eigenvectors): the Gauss quadrature of v's spectral measure,
    exact for polynomials of degree ``<= 2 steps - 1``. Averaged over v it estimates the eigenvalue
    distribution, smoothed by a Gaussian kernel of width sigma.

    Args:
        matvec: ``v -> A v`` on ``(dim,)`` tensors; A must be symmetric.
        dim: length of the vectors A acts on.
        num_vectors: number of random start vectors n_v.
        steps: Lanczos steps per vector m (clipped to ``dim``; a vector whose Krylov space becomes invariant
            stops early, which is exact).
        grid: ``(G,)`` points to evaluate the density at; default ``num_grid`` points spanning
            ``[min theta - 5 sigma, max theta + 5 sigma]``.
        num_grid: number of default grid points.
        sigma: kernel width; default 1% of ``max theta - min theta`` (of ``max |theta|``, or 1.0, when all
            Ritz values coincide): narrow enough to separate outliers from the bulk, wide enough to be smooth
            on a 400-point grid (PyHessian's sigma^2 = 1e-5 of the width is far below a grid spacing).
        distribution: ``"rademacher"`` (default, lower variance) or ``"gaussian"``, normalized to unit norm;
            both give ``E[v v^T] = I / dim``.
        reorthogonalize: full reorthogonalization (default).
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the CPU).
        progress: called with ``(steps done, num_vectors * steps)`` after every Lanczos step.

    Returns:
        :class:`Density`.
    """
    _require_positive(dim=dim, num_vectors=num_vectors, steps=steps, num_grid=num_grid)
    if distribution not in DISTRIBUTIONS:
        raise CurvscopeError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if sigma is not None and not sigma > 0:
        raise CurvscopeError(f"sigma must be positive, got {sigma}")
    gen, device = _generator(generator), _device(device)
    draw = _rademacher if distribution == "rademacher" else _gaussian
    steps = min(steps, dim)
    nodes, weights, matvecs = [], [], 0
    for v in range(num_vectors):
        krylov = _Krylov(matvec, draw(dim, gen, dtype, device), steps, reorthogonalize=reorthogonalize,
                         keep_basis=False)
        while krylov.m < steps and not krylov.invariant:
            krylov.step()
            _tick(progress, "density", v * steps + krylov.m, num_vectors * steps)
        if krylov.m < steps:
            _tick(progress, "density", (v + 1) * steps, num_vectors * steps)
        theta, tau = _quadrature(krylov, steps)
        nodes.append(theta)
        weights.append(tau)
        matvecs += krylov.matvecs
    nodes_t = torch.stack(nodes).to(dtype=dtype, device=device)
    weights_t = torch.stack(weights).to(dtype=dtype, device=device)
    sigma = default_sigma(nodes_t) if sigma is None else float(sigma)
    if grid is None:
        grid_t = _default_grid(nodes_t, sigma, num_grid)
    else:
        grid_t = grid.reshape(-1).to(dtype=dtype, device=device)
    values = gaussian_density(grid_t, nodes_t, weights_t, sigma)
    return Density(grid=grid_t, values=values, nodes=nodes_t, weights=weights_t, sigma=float(sigma), dim=dim,
                   matvecs=matvecs)
