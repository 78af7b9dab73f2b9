"""Order 3: the cubic-regularized model of the reduced step and its minimizer (``docs/conventions.md §6``).

The diagonal ``d3`` of the order-3 reduced tensor
(:func:`~curvscope.curvature.lr.reduced.third_order_diagonal`) regularizes the quadratic model
anisotropically.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cubic_model(eta: Tensor, g_hat: Tensor, h_bar: Tensor, d3: Tensor, weight: float = 1.0) -> float:
    """The cubic-regularized model ``m3(eta)`` (float64).

    ``m3(eta) = -eta^T g_hat + 1/2 eta^T H_bar eta + (weight/6) sum_s |d3_s| |eta_s|^3``; shapes as in
    :func:`cubic_rates`.
    """
    e, g, H = eta.to(torch.float64), g_hat.to(torch.float64), h_bar.to(torch.float64)
    a = weight * d3.to(torch.float64).abs()
    return float(-e @ g + 0.5 * e @ H @ e + (a * e.abs() ** 3).sum() / 6)


def cubic_rates(g_hat: Tensor, h_bar: Tensor, d3: Tensor, weight: float = 1.0, max_iter: int = 500
                ) -> tuple[Tensor | None, str]:
    """Rates minimizing the anisotropically cubic-regularized model of the paper (order 3).

        m3(eta) = -eta^T g_hat + 1/2 eta^T H_bar eta + (weight/6) sum_s |d3_s| |eta_s|^3

    The cubic term makes the model bounded below even where ``H_bar`` is not positive definite, and it is
    invariant under rescaling one group's direction (``u_s -> c u_s`` scales ``eta_s`` by ``1/c``, ``d3_s`` by
    ``c^3``). Minimized from ``eta = 0`` by a modified Newton method (Hessian shifted to positive definite,
    Armijo backtracking): a local minimizer.

    Args:
        g_hat: the reduced gradient ``(S,)``.
        h_bar: the reduced curvature ``(S, S)``.
        d3: the order-3 diagonal ``(S,)`` from
            :func:`~curvscope.curvature.lr.reduced.third_order_diagonal`.
        weight: the weight of the cubic term (> 0).
        max_iter: at most this many Newton iterations.

    Returns:
        The minimizer ``(S,)`` float64 and ``"ok"`` (or why the iteration stopped early); ``None`` with the
        reason when the model is unbounded below (``H_bar`` not positive definite on the groups whose ``d3_s``
        is 0).
    """
    g, H = g_hat.to(torch.float64), h_bar.to(torch.float64)
    a = weight * d3.to(torch.float64).abs()
    S = g.shape[0]
    flat = a == 0
    if bool(flat.any()):
        sub = H[flat][:, flat]
        if float(torch.linalg.eigvalsh(sub)[0]) <= 0 and float(g[flat].abs().max()) > 0:
            return None, "unbounded: H-bar is not positive definite where the third derivative vanishes"

    def value(e: Tensor) -> float:
        return cubic_model(e, g, H, d3, weight)

    eta = torch.zeros(S, dtype=torch.float64)
    scale = float(g.abs().max())
    if scale == 0:
        return eta, "zero gradient"
    eye = torch.eye(S, dtype=torch.float64)
    for _ in range(max_iter):
        gradient = -g + H @ eta + 0.5 * a * eta.abs() * eta
        if float(gradient.abs().max()) <= 1e-13 * scale:
            return eta, "ok"
        hess = H + torch.diag(a * eta.abs())
        lam_min = float(torch.linalg.eigvalsh(hess)[0])
        shift = 0.0 if lam_min > 1e-12 * float(hess.abs().max()) else -lam_min + 1e-8 * (1 + abs(lam_min))
        d = -torch.linalg.solve(hess + shift * eye, gradient)
        f0, slope, t = value(eta), float(gradient @ d), 1.0
        while value(eta + t * d) > f0 + 1e-4 * t * slope and t > 1e-20:
            t /= 2
        if t <= 1e-20:
            return eta, "stopped: the line search found no further decrease"
        eta = eta + t * d
    return eta, f"stopped after {max_iter} iterations"
