"""SymO: the preconditioned direction (R(Sigma) + eps I)^{-1/2} g and a line search along it.

``docs/conventions.md §7``. The direction comes from the factors (one ``eigh`` per small C_tau); the line
search compares the quadratic model's predicted loss change (exact Hessian, one Hessian-vector product) with the
realized one along ``theta - step * direction``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvscope.curvature.symmetry.discover import problem_chain
from curvscope.curvature.symmetry.factors import Factors, single_gradient_factors
from curvscope.curvature.symmetry.groups import build_structure
from curvscope.errors import OptionError
from curvscope.reprs import compact_repr

if TYPE_CHECKING:
    from curvscope.curvature.symmetry.estimate import FactorsResult

DEFAULT_STEPS = tuple(10.0 ** (k / 2) for k in range(-10, 1))
"""The SymO line-search step sizes: 1e-5 .. 1 in half decades."""


def inverse_sqrt(eps: float) -> Callable[[Tensor], Tensor]:
    """f(x) = (x + eps)^{-1/2} on eigenvalues clamped at zero (the SymO preconditioner)."""
    if not eps > 0:
        raise OptionError("eps", f"must be positive, got {eps}")
    return lambda evals: (evals.clamp_min(0) + eps).rsqrt()


def _direction(problem, factors: Factors, gradient: dict[str, Tensor], eps: float) -> dict[str, Tensor]:
    """(R(Sigma) + eps I)^{-1/2} g, parameter-shaped, keyed like ``problem.params`` (zeros outside the chain)."""
    u = factors.apply(gradient, inverse_sqrt(eps))
    return {n: u[n] if n in u else torch.zeros_like(p) for n, p in problem.params.items()}


def symo_direction(problem, layers: str | Sequence[str] | None = None, symmetry: str = "orthogonal",
                   eps: float = 1e-8) -> dict[str, Tensor]:
    """The SymO direction Sigma^{-1/2} g, Sigma = R(g g^T) from the batch gradient g, damped by ``eps``.

    Returns parameter-shaped tensors keyed like ``problem.params``, zero outside the Linear chain; the SymO
    update is ``theta - lr * direction``. For two-layer nets this is the joint (Phi_1, Psi_1, Phi_2) inverse
    square root (the hidden bias joins it), for deeper nets one block per component.
    """
    chain = problem_chain(problem, layers)
    structure = build_structure(chain, symmetry)
    g = problem.gradient()
    factors = single_gradient_factors(structure, {n: g[n] for n in chain.param_names})
    return _direction(problem, factors, g, eps)


@dataclass
class SymoResult:
    """The SymO direction u = (R(Sigma) + eps I)^{-1/2} g and a line search along ``theta - step * u``.

    Attributes:
        direction: parameter-shaped, keyed like ``problem.params`` (zeros outside the chain).
        eps: the damping.
        g_dot_u: g^T u (the first-order decrease per unit step).
        curvature: u^T H u with the loss Hessian H (one Hessian-vector product).
        steps: ``(K,)`` step sizes; predicted: ``(K,)`` quadratic-model change
            ``-step g^T u + step^2 u^T H u / 2``; predicted_linear: ``(K,)`` ``-step g^T u``; realized: ``(K,)``
            ``L(theta - step u) - L(theta)``.
        best_step: the step with the lowest realized loss, or ``None`` when no step lowers the loss.
    """

    __repr__ = compact_repr

    direction: dict[str, Tensor]
    eps: float
    g_dot_u: float
    curvature: float
    steps: Tensor
    predicted: Tensor
    predicted_linear: Tensor
    realized: Tensor
    best_step: float | None


def symo_step(problem, result: FactorsResult, eps: float = 1e-8, steps: Sequence[float] = DEFAULT_STEPS
              ) -> SymoResult:
    """The SymO direction from ``result``'s factors, and a line search comparing the predicted and realized
    loss change."""
    return line_search(problem, _direction(problem, result.factors, result.gradient, eps), eps, steps)


def line_search(problem, direction: dict[str, Tensor], eps: float, steps: Sequence[float] = DEFAULT_STEPS
                ) -> SymoResult:
    """Predicted (quadratic model with the exact Hessian) vs realized loss change along ``-direction``."""
    from curvscope.curvature.products import hessian_vector_products

    params = problem.params
    g = problem.gradient()
    hu = {n: t[0] for n, t in hessian_vector_products(problem, {n: direction[n].unsqueeze(0) for n in params}).items()}
    g_dot_u = float(sum((g[n].double() * direction[n].double()).sum() for n in params))
    curvature = float(sum((hu[n].double() * direction[n].double()).sum() for n in params))
    with torch.no_grad():
        base = float(problem.loss_value())
        realized = []
        for s in steps:
            moved = {n: p - s * direction[n] for n, p in params.items()}
            value = float(problem.loss_value(moved))
            realized.append(value - base if math.isfinite(value) else math.inf)
    t = torch.tensor(list(steps), dtype=torch.float64)
    predicted_linear = -t * g_dot_u
    predicted = predicted_linear + 0.5 * t ** 2 * curvature
    realized_t = torch.tensor(realized, dtype=torch.float64)
    best = int(torch.argmin(realized_t))
    best_step = float(t[best]) if realized_t[best] < 0 else None
    return SymoResult(direction, eps, g_dot_u, curvature, t, predicted, predicted_linear, realized_t, best_step)
