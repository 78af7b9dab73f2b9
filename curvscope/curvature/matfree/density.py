"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; §9).

For each random unit start vector, a :class:`~curvscope.curvature.matfree.krylov._Krylov` run gives the Gauss
quadrature (Ritz values and weights) of the vector's spectral measure; :func:`gaussian_density` averages them
under a Gaussian kernel. The conventions (operators, randomness, dtype, device, progress) are those of
:mod:`curvscope.curvature.matfree.krylov`.

Memory (``max_vectors``, :mod:`~curvscope.curvature.matfree.budget`): the start vectors are streamed, one Lanczos
run at a time, and a run keeps for the quadrature only its tridiagonal (``2 m`` numbers). Its basis is what takes
memory: with full reorthogonalization all ``m`` basis vectors are held (``m + 5`` vectors). Under a smaller
budget a run keeps a window of its last ``w = max_vectors - 2`` basis vectors (:class:`_WindowLanczos`) and
orthogonalizes each new vector against that window only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.matfree.adapter import MatVec, _apply, _resolve
from curvscope.curvature.matfree.budget import (
    DENSITY_MIN_VECTORS,
    check_max_vectors,
    density_window,
    require_vectors,
)
from curvscope.curvature.matfree.krylov import DEFAULT_STEPS, _Krylov, _tridiagonal
from curvscope.curvature.matfree.vectors import (
    DISTRIBUTIONS,
    _device,
    _gaussian,
    _generator,
    _rademacher,
    _require_positive,
)
from curvscope.errors import CurvscopeError
from curvscope.progress import Progress, stage

DEFAULT_SIGMA_FRACTION = 0.01  # default SLQ kernel width, as a fraction of the spread of the Ritz values
GRID_PAD_SIGMAS = 5.0  # the default SLQ grid extends this many sigmas beyond the extreme Ritz values


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


class _WindowLanczos:
    """Lanczos that keeps only the tridiagonal and a window of its last ``window`` basis vectors (a ring).

    Each new vector is orthogonalized twice (classical Gram-Schmidt) against the window, which contains the
    three-term recurrence's two vectors: with ``window >= steps`` this is full reorthogonalization, with
    ``window == 2`` the plain recurrence, in between local reorthogonalization. Memory: the window and two work
    vectors (the product and its orthogonalized copy). It has the members of
    :class:`~curvscope.curvature.matfree.krylov._Krylov` that :func:`_quadrature` and
    :func:`spectral_density` use.
    """

    def __init__(self, matvec: MatVec, start: Tensor, window: int) -> None:
        self.matvec, self.dim = matvec, start.numel()
        self.window = torch.empty(window, self.dim, dtype=start.dtype, device=start.device)
        torch.div(start, torch.linalg.vector_norm(start), out=self.window[0])
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.beta_next, self.norm_estimate, self.matvecs = 0.0, 0.0, 0
        self.invariant = False
        self.tiny = torch.finfo(start.dtype).eps ** 0.75

    @property
    def m(self) -> int:
        return len(self.alphas)

    def step(self) -> None:
        """One Lanczos step from the newest basis vector (the run must not be invariant)."""
        j, size = self.m, self.window.shape[0]
        if j > 0:
            self.betas.append(self.beta_next)
        rows, slot = self.window[: min(j + 1, size)], j % size
        w = _apply(self.matvec, self.window[slot])
        self.matvecs += 1
        before = float(torch.linalg.vector_norm(w))
        h = rows @ w
        w = torch.addmv(w, rows.T, h, alpha=-1.0)
        alpha = float(h[slot])
        if not float(torch.linalg.vector_norm(w)) > before / math.sqrt(2.0):  # "twice is enough"
            h = rows @ w
            w = torch.addmv(w, rows.T, h, alpha=-1.0)
            alpha += float(h[slot])
        beta = float(torch.linalg.vector_norm(w))
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise CurvscopeError(f"matvec returned non-finite values at Lanczos step {j + 1}")
        previous = self.betas[-1] if j > 0 else 0.0
        self.norm_estimate = max(self.norm_estimate, abs(alpha) + beta + previous)
        self.alphas.append(alpha)
        self.beta_next = beta
        self.invariant = beta <= self.tiny * self.norm_estimate or self.m >= self.dim
        if not self.invariant:
            torch.div(w, beta, out=self.window[(j + 1) % size])


def _quadrature(krylov: _Krylov | _WindowLanczos, steps: int) -> tuple[Tensor, Tensor]:
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


def spectral_density(operator: Any, dim: int | None = None, *, num_vectors: int = 8, steps: int = DEFAULT_STEPS,
                     grid: Tensor | None = None, num_grid: int = 400, sigma: float | None = None,
                     distribution: str = "rademacher", reorthogonalize: bool = True,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None, progress: Progress | None = None,
                     max_vectors: int | None = None) -> Density:
    """Spectral density by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; PyHessian).

    For each of ``num_vectors`` random unit vectors v, ``steps`` Lanczos steps give Ritz values theta_i and
    weights tau_i (squared first components of T's eigenvectors): the Gauss quadrature of v's spectral measure,
    exact for polynomials of degree ``<= 2 steps - 1``. Averaged over v it estimates the eigenvalue
    distribution, smoothed by a Gaussian kernel of width sigma.

    Args:
        operator: the symmetric ``A`` of shape ``(dim, dim)``: a curvscope ``Operator``, a SciPy
            ``LinearOperator``, a curvlinops operator, a ``(dim, dim)`` tensor, or a function ``v -> A v`` on
            ``(dim,)`` tensors (see :func:`~curvscope.curvature.matfree.adapter.as_matvec`).
        dim: length of the vectors A acts on; required for a plain function, else read from ``operator.shape``.
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
        reorthogonalize: full reorthogonalization (default); under a ``max_vectors`` too small for the whole
            basis, reorthogonalization against the window of the last ``max_vectors - 2`` basis vectors.
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the CPU).
        progress: ``progress(stage, done, total)``; called as ``("density", steps done, num_vectors * steps)``
            after every Lanczos step (a vector that stops early jumps to the end of its share).
        max_vectors: vectors of ``dim`` numbers a run may hold at once, the product included (``None``: no
            limit). With ``min(steps, dim) + 5`` (6 without reorthogonalization) the whole basis is kept and the
            numbers are those without a budget. Below that, a run keeps a window of the last ``w = max_vectors -
            2`` basis vectors (2 without reorthogonalization): the new vector is orthogonal to the window only.
            Once a Ritz value converges, orthogonality to older vectors is lost as in plain Lanczos and the
            Ritz values get spurious copies ("ghosts") that share the converged value's weight. The
            nodes and weights are then the Gauss quadrature of a measure close to v's (Greenbaum 1989):
            moments and the smoothed density stay accurate, individual nodes are not eigenvalue estimates
            (``docs/conventions.md`` §9). At least 4.

    Returns:
        :class:`Density`.

    Raises:
        OptionError: ``max_memory`` when ``max_vectors < 4`` (the message names the bytes needed).
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, num_vectors=num_vectors, steps=steps, num_grid=num_grid)
    max_vectors = check_max_vectors(max_vectors)
    require_vectors(max_vectors, DENSITY_MIN_VECTORS, dim, dtype, "a spectral density (Lanczos quadrature)")
    if distribution not in DISTRIBUTIONS:
        raise CurvscopeError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if sigma is not None and not sigma > 0:
        raise CurvscopeError(f"sigma must be positive, got {sigma}")
    gen, device, report = _generator(generator), _device(device, home), stage(progress, "density")
    draw = _rademacher if distribution == "rademacher" else _gaussian
    steps = min(steps, dim)
    window = density_window(steps, max_vectors, reorthogonalize)
    nodes, weights, matvecs = [], [], 0
    for v in range(num_vectors):
        if window is None:
            krylov = _Krylov(matvec, draw(dim, gen, dtype, device), steps, reorthogonalize=reorthogonalize,
                             keep_basis=False)
        else:
            krylov = _WindowLanczos(matvec, draw(dim, gen, dtype, device), window)
        while krylov.m < steps and not krylov.invariant:
            krylov.step()
            report(v * steps + krylov.m, num_vectors * steps)
        if krylov.m < steps:
            report((v + 1) * steps, num_vectors * steps)
        theta, tau = _quadrature(krylov, steps)
        nodes.append(theta)
        weights.append(tau)
        matvecs += krylov.matvecs
        del krylov  # the next run's basis is allocated only once this one's is freed
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
