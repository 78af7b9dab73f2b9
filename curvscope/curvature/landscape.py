"""The batch loss along one direction and over the plane of two, next to its quadratic model.

``docs/conventions.md`` §9. Along a unit direction d1 (typically the top Hessian or GGN eigenvector),
``L(theta + t d1)`` for ``t`` in ``[-r, r]`` is compared with the second-order model

    q(t) = L0 + t (g . d1) + (1/2) kappa t²,

where ``g`` is the batch gradient and ``kappa`` the curvature along d1: the eigenvalue passed in, or else
``d1ᵀ H d1`` from one Hessian-vector product (then q matches L to O(t³) near 0). Over the plane of d1 and a
second direction d2 (orthonormalized against d1), ``L(theta + s d1 + t d2)`` on a square grid. Every loss is
evaluated without autograd, over the batch in chunks of samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.curvature.matfree.operators import hessian_operator
from curvscope.errors import CurvscopeError

MIN_LOSS_FOR_RADIUS = 1e-3


@dataclass(repr=False)
class Landscape:
    """What :func:`loss_landscape` returns. Tensors are float64 on the CPU.

    Attributes:
        t: ``(P,)`` offsets along d1, ``linspace(-radius, radius, points)``.
        loss_1d: ``(P,)`` ``L(theta + t_i d1)``.
        quadratic_1d: ``(P,)`` ``L0 + t_i slope + curvature t_i² / 2``.
        grid_s, grid_t: ``(Q,)`` offsets along d1 and d2, ``linspace(-radius_2d, radius_2d, points_2d)``;
            ``None`` without a second direction.
        loss_2d: ``(Q, Q)`` with ``loss_2d[i, j] = L(theta + grid_s[i] d1 + grid_t[j] d2)``; ``None`` without d2.
        loss0: ``L(theta)``; slope: ``g . d1``; curvature: kappa of the quadratic model.
        radius, radius_2d: the half-widths of the 1-D and 2-D ranges.
        direction1: ``(D,)`` unit d1, flat over every trainable parameter (``named_parameters()`` order).
        direction2: ``(D,)`` unit d2 orthogonal to d1, or ``None``.
    """

    t: Tensor
    loss_1d: Tensor
    quadratic_1d: Tensor
    grid_s: Tensor | None
    grid_t: Tensor | None
    loss_2d: Tensor | None
    loss0: float
    slope: float
    curvature: float
    radius: float
    radius_2d: float | None
    direction1: Tensor
    direction2: Tensor | None

    def __repr__(self) -> str:
        plane = "none" if self.loss_2d is None else f"{self.loss_2d.shape[0]}x{self.loss_2d.shape[1]}"
        return (f"Landscape(points={self.t.numel()}, plane={plane}, radius={self.radius:.4g}, "
                f"loss0={self.loss0:.6g}, slope={self.slope:.4g}, curvature={self.curvature:.4g})")


def _flat_direction(problem, d) -> Tensor:
    """One direction (flat ``(D,)`` tensor or name -> parameter-shaped dict; missing names are 0) as ``(D,)``."""
    if isinstance(d, dict):
        unknown = [n for n in d if n not in problem.params]
        if unknown:
            raise CurvscopeError(f"direction names unknown parameter(s): {', '.join(unknown)}")
        parts = []
        for n, p in problem.params.items():
            if n not in d:
                parts.append(torch.zeros(p.numel(), dtype=problem.dtype, device=problem.device))
                continue
            v = torch.as_tensor(d[n])
            if v.numel() != p.numel():
                raise CurvscopeError(f"direction for '{n}' has {v.numel()} entries, the parameter "
                                     f"{tuple(p.shape)} has {p.numel()}")
            parts.append(v.reshape(-1).to(dtype=problem.dtype, device=problem.device))
        return torch.cat(parts)
    v = torch.as_tensor(d)
    if v.numel() != problem.num_params:
        raise CurvscopeError(f"a flat direction needs {problem.num_params} entries (every trainable "
                             f"parameter), got {v.numel()}")
    return v.reshape(-1).to(dtype=problem.dtype, device=problem.device)


def _split_directions(problem, directions) -> list:
    """``directions`` as a list of one or two single directions."""
    if isinstance(directions, dict):
        stacked = all(torch.as_tensor(v).dim() == problem.params[n].dim() + 1
                      for n, v in directions.items() if n in problem.params)
        if directions and stacked:  # name -> (k, *shape), e.g. MatfreeResult.eigenvectors
            k = {torch.as_tensor(v).shape[0] for v in directions.values()}
            if len(k) != 1:
                raise CurvscopeError("stacked directions must have the same number of rows for every parameter")
            return [{n: v[i] for n, v in directions.items()} for i in range(k.pop())]
        return [directions]
    if isinstance(directions, Tensor):
        if directions.dim() == 2:
            return list(directions)
        return [directions]
    if isinstance(directions, Sequence):
        return list(directions)
    raise CurvscopeError("directions: pass a flat tensor, a name -> tensor dict, or a sequence of one or two")


def _unit_directions(problem, directions) -> tuple[Tensor, Tensor | None]:
    items = _split_directions(problem, directions)
    if not 1 <= len(items) <= 2:
        raise CurvscopeError(f"loss_landscape takes one or two directions, got {len(items)}")
    d1 = _flat_direction(problem, items[0])
    n1 = float(torch.linalg.vector_norm(d1))
    if not (math.isfinite(n1) and n1 > 0):
        raise CurvscopeError("the first direction must be finite and nonzero")
    d1 = d1 / n1
    if len(items) == 1:
        return d1, None
    d2 = _flat_direction(problem, items[1])
    n2 = float(torch.linalg.vector_norm(d2))
    d2 = d2 - (d1 @ d2) * d1
    n2_perp = float(torch.linalg.vector_norm(d2))
    if not (math.isfinite(n2_perp) and n2_perp > 1e-8 * n2):
        raise CurvscopeError("the second direction must be finite and not parallel to the first")
    return d1, d2 / n2_perp


def _unflatten(problem, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, p in problem.params.items():
        out[n] = flat[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def batch_loss(problem, params: dict[str, Tensor], chunk_size: int | None = None) -> float:
    """``L`` at ``params`` without autograd, summing per-sample losses over chunks of ``chunk_size`` samples
    (default: the whole batch at once): ``L = (1/N) sum_n l_n``."""
    n = problem.batch_size
    step = n if chunk_size is None else max(1, int(chunk_size))
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, n, step):
            total += problem.per_sample_loss(params, (i, min(i + step, n))).to(torch.float64).sum().cpu()
    return float(total / n)


def default_radius(loss0: float, eigenvalue: float | None) -> float:
    """``2 sqrt(2 max(L0, 1e-3) / lambda)`` for an eigenvalue ``lambda > 0``, else 1.0.

    At that radius the quadratic model ``L0 + lambda r² / 2`` has risen by ``4 max(L0, 1e-3)``: far enough for
    the loss to leave its quadratic regime, close enough to stay in the region the curvature describes.
    """
    if eigenvalue is None or not eigenvalue > 0 or not math.isfinite(eigenvalue):
        return 1.0
    return 2.0 * math.sqrt(2.0 * max(loss0, MIN_LOSS_FOR_RADIUS) / eigenvalue)


def loss_landscape(problem, directions, *, radius: float | None = None, points: int = 21, points_2d: int = 15,
                   eigenvalue: float | None = None, radius_2d: float | None = None,
                   chunk_size: int | None = None) -> Landscape:
    """The batch loss along d1 (with its quadratic model) and over the plane of d1 and d2.

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        directions: d1, or (d1, d2): each a flat ``(D,)`` tensor over every trainable parameter or a
            name -> parameter-shaped dict (missing names are 0); also a ``(2, D)`` tensor or a dict of
            ``(k, *shape)`` rows with k = 1 or 2 (e.g. ``MatfreeResult.eigenvectors`` sliced to two rows).
            d1 is scaled to unit norm; d2 is orthogonalized against d1 and scaled to unit norm.
        radius: half-width r of the 1-D range; default :func:`default_radius` (from ``eigenvalue``, else 1.0).
        points: P, number of offsets in ``[-r, r]`` (odd P includes 0).
        points_2d: Q, grid points per axis of the plane (Q² loss evaluations); 0 skips the plane.
        eigenvalue: the curvature kappa along d1 for the quadratic model and the default radius (e.g. the
            eigenvalue d1 belongs to). Default: ``kappa = d1ᵀ H d1`` by one Hessian-vector product.
        radius_2d: half-width of the plane's axes (default: ``radius``).
        chunk_size: samples per forward pass (default: the whole batch).

    Returns:
        :class:`Landscape` (float64 CPU tensors).
    """
    if int(points) != points or points < 1:
        raise CurvscopeError(f"points must be a positive integer, got {points}")
    if int(points_2d) != points_2d or points_2d < 0:
        raise CurvscopeError(f"points_2d must be a non-negative integer, got {points_2d}")
    d1, d2 = _unit_directions(problem, directions)
    theta = torch.cat([p.reshape(-1) for p in problem.params.values()])
    loss0 = batch_loss(problem, problem.params, chunk_size)
    grad = problem.gradient()
    slope = float(torch.cat([grad[n].reshape(-1) for n in problem.params]) @ d1)
    if eigenvalue is not None:
        curvature = float(eigenvalue)
    else:
        curvature = float(d1 @ hessian_operator(problem).matvec(d1))
    r = default_radius(loss0, eigenvalue) if radius is None else float(radius)
    if not (math.isfinite(r) and r > 0):
        raise CurvscopeError(f"radius must be positive, got {radius}")

    t = torch.linspace(-r, r, int(points), dtype=torch.float64)
    loss_1d = torch.tensor([batch_loss(problem, _unflatten(problem, theta + float(ti) * d1), chunk_size)
                            for ti in t], dtype=torch.float64)
    quadratic_1d = loss0 + t * slope + 0.5 * curvature * t**2

    grid_s = grid_t = loss_2d = r2 = None
    if d2 is not None and points_2d:
        r2 = r if radius_2d is None else float(radius_2d)
        if not (math.isfinite(r2) and r2 > 0):
            raise CurvscopeError(f"radius_2d must be positive, got {radius_2d}")
        grid_s = torch.linspace(-r2, r2, int(points_2d), dtype=torch.float64)
        grid_t = grid_s.clone()
        loss_2d = torch.empty(int(points_2d), int(points_2d), dtype=torch.float64)
        for i, si in enumerate(grid_s.tolist()):
            row = theta + si * d1
            for j, tj in enumerate(grid_t.tolist()):
                loss_2d[i, j] = batch_loss(problem, _unflatten(problem, row + tj * d2), chunk_size)
    return Landscape(t=t, loss_1d=loss_1d, quadratic_1d=quadratic_1d, grid_s=grid_s, grid_t=grid_t, loss_2d=loss_2d,
                     loss0=loss0, slope=slope, curvature=curvature, radius=r, radius_2d=r2,
                     direction1=d1.detach().to("cpu", torch.float64),
                     direction2=None if d2 is None else d2.detach().to("cpu", torch.float64))
