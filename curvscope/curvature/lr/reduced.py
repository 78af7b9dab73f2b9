"""The reduced model of the step ``theta(eta) = theta - sum_s eta_s u_s`` (``docs/conventions.md §6``).

For S parameter groups and a direction ``u`` (``u_s``: ``u`` restricted to group s),

    L(theta(eta)) ~ L(theta) - eta^T g_hat + 1/2 eta^T H_bar eta + (order 3: d3),
    g_hat_s = g_s^T u_s,   H_bar_st = u_s^T H u_t   (S x S),

with ``H`` the Hessian (S batched Hessian-vector products) or the GGN (S batched Jacobian-vector products), and
``d3_s = d^3 L(theta(eta)) / d eta_s^3`` at ``eta = 0``. The products are those of
:mod:`curvscope.curvature.products`: forward-mode AD where the model supports it, else double backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvscope.curvature import products
from curvscope.errors import CurvscopeError
from curvscope.problem import CURVATURES, ParamGroup, Problem


def group_tangents(direction: dict[str, Tensor], groups: list[ParamGroup]) -> dict[str, Tensor]:
    """The S restrictions ``u_s`` stacked.

    Args:
        direction: ``u``, one tensor per parameter.
        groups: the S parameter groups.

    Returns:
        For each parameter a tensor ``(S, *shape)`` whose row s is the parameter's part of ``u`` when it belongs
        to group s, zero otherwise.
    """
    out = {}
    for name, u in direction.items():
        rows = [u if name in group.param_names else torch.zeros_like(u) for group in groups]
        out[name] = torch.stack(rows)
    return out


def _pairwise(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    """``(S, T)`` matrix of inner products ``<a_s, b_t>`` summed over parameters (rows stacked first)."""
    return sum(x.reshape(x.shape[0], -1) @ b[n].reshape(b[n].shape[0], -1).T for n, x in a.items())


def reduced_gradient(gradient: dict[str, Tensor], direction: dict[str, Tensor],
                     groups: list[ParamGroup]) -> Tensor:
    """The reduced gradient ``g_hat`` ``(S,)``: ``g_hat_s = g_s^T u_s``.

    That is minus the derivative of ``L(theta(eta))`` at ``eta = 0``.

    Args:
        gradient: ``g``, one tensor per parameter.
        direction: ``u``, one tensor per parameter.
        groups: the S parameter groups.
    """
    return torch.stack([sum((gradient[n] * direction[n]).sum() for n in group.param_names)
                        for group in groups])


def reduced_hessian(problem: Problem, direction: dict[str, Tensor], groups: list[ParamGroup],
                    curvature: str = "hessian") -> Tensor:
    """The reduced curvature ``H_bar`` ``(S, S)``, symmetrized (``(A + A^T)/2``) against rounding.

    Args:
        problem: the model, batch and loss.
        direction: ``u``, one tensor per parameter.
        groups: the S parameter groups.
        curvature: ``hessian``: ``u_s^T H u_t`` (S batched Hessian-vector products); ``ggn``:
            ``(1/N) sum_n (J_n u_s)^T H_n (J_n u_t)`` (S batched Jacobian-vector products).

    Raises:
        CurvscopeError: ``curvature`` is none of :data:`CURVATURES`.
    """
    if curvature not in CURVATURES:
        choices = sorted(CURVATURES, key=lambda c: c != "hessian")  # the default first
        raise CurvscopeError(f"curvature '{curvature}': choose one of {', '.join(choices)}")
    U = group_tangents(direction, groups)
    if curvature == "hessian":
        h_bar = _pairwise(U, products.hessian_vector_products(problem, U))
    else:
        JU = products.output_jvps(problem, U)  # (S, N, C)
        with torch.no_grad():
            outputs = problem.forward()
        H = problem.loss.hessian(outputs, problem.targets)  # (N, C, C)
        h_bar = torch.einsum("snc,ncd,tnd->st", JU, H, JU) / problem.batch_size
    from curvscope.curvature.finite import check_finite

    check_finite(f"the reduced {curvature} H_bar", h_bar=h_bar.detach())
    check_symmetric(h_bar.detach(), curvature, problem.eps)
    return ((h_bar + h_bar.T) / 2).detach()


class SelfCheckError(RuntimeError):
    """A computed quantity failed a built-in consistency check (a bug, or an autograd transform that is wrong
    for this model): an internal error, never silently repaired."""


def check_symmetric(h_bar: Tensor, curvature: str, eps: float | None = None) -> float:
    """The relative asymmetry ``max|A - A^T| / max|A|`` of ``H_bar``, checked before it is symmetrized.

    Rounding of the products leaves an asymmetry of order eps; a wrong Hessian-vector product (as
    ``torch.func.hessian`` is through LayerNorm + GELU in torch 2.14) leaves a large one. ``eps`` is that of the
    precision the model really computes in (``problem.eps``: float32's for a Llama whose RMSNorm and softmax
    upcast to float32 only, even in a float64 run); default: ``h_bar``'s dtype's.

    Raises:
        SelfCheckError: the asymmetry exceeds ``sqrt(eps)`` (3.5e-4 in float32, 1.5e-8 in float64).
    """
    scale = float(h_bar.abs().max()) if h_bar.numel() else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return 0.0
    asymmetry = float((h_bar - h_bar.T).abs().max()) / scale
    tolerance = math.sqrt(torch.finfo(h_bar.dtype).eps if eps is None else eps)
    if asymmetry > tolerance:
        raise SelfCheckError(f"self-check failed: the reduced {curvature} H_bar is asymmetric beyond rounding "
                             f"(relative {asymmetry:.2e} > {tolerance:.1e}); its {curvature}-vector products are "
                             "wrong for this model, so no rates are reported")
    return asymmetry


def third_order_diagonal(problem: Problem, direction: dict[str, Tensor], groups: list[ParamGroup]) -> Tensor:
    """The order-3 diagonal ``d3`` ``(S,)``: ``d^3 L(theta(eta)) / d eta_s^3`` at ``eta = 0``.

    That is ``-D^3 L[u_s, u_s, u_s]``: three nested forward-mode derivatives along ``u_s``, batched over s.

    Args:
        problem: the model, batch and loss.
        direction: ``u``, one tensor per parameter.
        groups: the S parameter groups.
    """
    return -products.third_derivatives(problem, group_tangents(direction, groups)).detach()


def step_params(params: dict[str, Tensor], direction: dict[str, Tensor], groups: list[ParamGroup],
                eta: Tensor) -> dict[str, Tensor]:
    """The stepped parameters ``theta(eta) = theta - sum_s eta_s u_s``.

    Args:
        params: ``theta``, one tensor per parameter.
        direction: ``u``, one tensor per parameter.
        groups: the S parameter groups.
        eta: the rates ``(S,)``; ``nan`` entries count as 0 (the group does not move).
    """
    eta = torch.nan_to_num(eta.to(torch.float64), nan=0.0).tolist()
    out = dict(params)
    for s, group in enumerate(groups):
        for name in group.param_names:
            out[name] = params[name] - eta[s] * direction[name]
    return out
