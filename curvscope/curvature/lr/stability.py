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
    ``eps(dtype) * lambda_max(G)`` is numerically zero (its parameters do not move the outputs): no bound
    (``nan``); likewise the whole bound when ``lambda_max(G) = 0``.
    """
    from curvscope.curvature.spectrum import compute_spectrum

    # one pass: the whole model comes first (groups[0]), then the blocks of the partition
    spectrum = compute_spectrum(problem, groups=partition, directional=False, include_total=True).groups
    whole = float(spectrum[0].lambda_max)
    blocks = {g.name: g.lambda_max for g in (spectrum if partition == "all" else spectrum[1:])}
    missing = [g.name for g in groups if g.name not in blocks]
    if missing:
        raise RuntimeError(f"the spectrum engine returned no block for group(s) {missing}")
    lam = torch.tensor([float(blocks[g.name]) for g in groups], dtype=torch.float64)
    resolved = lam > max(whole * torch.finfo(problem.dtype).eps, 0.0)
    bound = torch.where(resolved, 2.0 / lam, torch.full_like(lam, math.nan))
    return lam, bound, whole, (2.0 / whole if whole > 0 else math.nan)
