"""Stability bounds of plain gradient descent from the GGN spectrum (``docs/conventions.md §6``).

Gradient descent is stable for ``lr < 2 / lambda_max(G)`` (``lr lambda_max = 2`` is the edge of stability);
per group the block bound ``2 / lambda_max(G_PP)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvscope.problem import ParamGroup, Problem


def stability_bounds(problem: Problem, partition: str, groups: list[ParamGroup]
                     ) -> tuple[Tensor, Tensor, float, float]:
    """The stability bounds from the GGN spectrum (the blocks of ``partition`` and the whole, from one pass).

    Returns ``lambda_max`` of each group's GGN block ``(S,)``, the block bounds ``2 / lambda_max(G_PP)`` ``(S,)``,
    ``lambda_max(G)`` and ``2 / lambda_max(G)``. A block whose ``lambda_max`` is at or below
    ``eps(problem.precision) * lambda_max(G)`` is numerically zero (its parameters do not move the outputs): no bound
    (``nan``); likewise the whole bound when ``lambda_max(G) = 0``.
    """
    whole, blocks = _largest_eigenvalues(problem, partition)
    missing = [g.name for g in groups if g.name not in blocks]
    if missing:
        raise RuntimeError(f"the spectrum engine returned no block for group(s) {missing}")
    lam = torch.tensor([float(blocks[g.name]) for g in groups], dtype=torch.float64)
    resolved = lam > max(whole * problem.eps, 0.0)
    bound = torch.where(resolved, 2.0 / lam, torch.full_like(lam, math.nan))
    return lam, bound, whole, (2.0 / whole if whole > 0 else math.nan)


MAX_GRAM_COLUMNS = 2048
"""Up to this many Gram columns the exact Gram gives lambda_max; beyond (sequences with a vocabulary, large
batches) Lanczos on GGN-vector products does, at the cost of a few dozen products per group."""


def _largest_eigenvalues(problem: Problem, partition: str) -> tuple[float, dict[str, float]]:
    """``lambda_max`` of the whole GGN and of each block of ``partition`` (one pass)."""
    from curvscope.curvature.gram.columns import count_columns

    if count_columns(problem) <= MAX_GRAM_COLUMNS:
        from curvscope.curvature.gram.spectrum import compute_spectrum

        # the whole model comes first (groups[0]), then the blocks of the partition
        spectrum = compute_spectrum(problem, groups=partition, directional=False, include_total=True).groups
        values = [(g.name, float(g.lambda_max)) for g in spectrum]
    else:
        from curvscope.curvature.matfree.spectrum import compute_matfree_spectrum

        result = compute_matfree_spectrum(problem, curvature="ggn", groups=partition, top_k=1, tol=1e-4,
                                          trace_matvecs=0, density_vectors=0, include_total=True)
        values = [(g.name, max(float(g.lambda_max), 0.0)) for g in result.groups]
    whole = values[0][1]
    return whole, dict(values if partition == "all" else values[1:])


JOINT_TOL = 1e-4
"""The Lanczos tolerance of :func:`joint_sharpness` (relative residual)."""


def joint_sharpness(problem: Problem, groups: list[ParamGroup], rates: Tensor) -> float:
    """``lambda_max(R^1/2 G R^1/2)``, R = diag(the rate of each parameter's group): the stability number of the
    step ``theta - sum_s eta_s g_s`` with per-group rates (gradient descent on the GGN's quadratic model is
    stable while it is below 2). With one rate for all it is ``eta lambda_max(G)``; the single-rate bound
    ``eta < 2/lambda_max(G)`` is sufficient for per-group rates, not necessary: a group may exceed it when the
    others are small. Lanczos on GGN-vector products (relative residual :data:`JOINT_TOL`).
    """
    from curvscope.curvature.matfree.eigen import extreme_eigenpairs
    from curvscope.curvature.matfree.operators import ggn_operator

    rate = {}
    for s, group in enumerate(groups):
        value = float(rates[s]) if math.isfinite(float(rates[s])) and float(rates[s]) > 0 else 0.0
        for name in group.param_names:
            rate[name] = value
    root = torch.cat([torch.full((p.numel(),), math.sqrt(rate.get(n, 0.0)), dtype=problem.dtype,
                                 device=problem.device) for n, p in problem.params.items()])
    if not bool((root > 0).any()):
        return 0.0
    G = ggn_operator(problem)
    result = extreme_eigenpairs(lambda v: root * G.matvec(root * v), dim=root.numel(), k=1, which="largest",
                                tol=JOINT_TOL, dtype=problem.dtype, device=problem.device)
    return max(float(result.top[0]), 0.0)
