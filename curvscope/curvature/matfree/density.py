"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; §9).

For each random unit start vector, a :class:`~curvscope.curvature.matfree.krylov._Krylov` run gives the Gauss
quadrature (Ritz values and weights) of the vector's spectral measure; :func:`gaussian_density` averages them
under a Gaussian kernel. The conventions (operators, randomness, dtype, device, progress) are those of
:mod:`curvscope.curvature.matfree.krylov`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.matfree.adapter import _resolve
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


def spectral_density(operator: Any, dim: int | None = None, *, num_vectors: int = 8, steps: int = DEFAULT_STEPS,
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
        reorthogonalize: full reorthogonalization (default).
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the CPU).
        progress: ``progress(stage, done, total)``; called as ``("density", steps done, num_vectors * steps)``
            after every Lanczos step (a vector that stops early jumps to the end of its share).

    Returns:
        :class:`Density`.
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, num_vectors=num_vectors, steps=steps, num_grid=num_grid)
    if distribution not in DISTRIBUTIONS:
        raise CurvscopeError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if sigma is not None and not sigma > 0:
        raise CurvscopeError(f"sigma must be positive, got {sigma}")
    gen, device, report = _generator(generator), _device(device, home), stage(progress, "density")
    draw = _rademacher if distribution == "rademacher" else _gaussian
    steps = min(steps, dim)
    nodes, weights, matvecs = [], [], 0
    for v in range(num_vectors):
        krylov = _Krylov(matvec, draw(dim, gen, dtype, device), steps, reorthogonalize=reorthogonalize,
                         keep_basis=False)
        while krylov.m < steps and not krylov.invariant:
            krylov.step()
            report(v * steps + krylov.m, num_vectors * steps)
        if krylov.m < steps:
            report((v + 1) * steps, num_vectors * steps)
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
