"""The results of the lr engine: plain dataclasses of tensors (``docs/conventions.md §6``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvscope.problem import ParamGroup
from curvscope.reprs import compact_repr


@dataclass
class StepCheck:
    """One rate set taken as a step, and what the loss did.

    Attributes:
        rates: ``(S,)`` (``nan``: the group does not move).
        predicted: the decrease the quadratic model predicts.
        realized: ``L(theta) - L(theta(eta))`` on the batch.
        realized_holdout: the same on the holdout (None without one).
        predicted_cubic: the decrease the cubic-regularized model predicts (None without order 3).
    """

    __repr__ = compact_repr

    rates: Tensor
    predicted: float
    realized: float
    realized_holdout: float | None = None
    predicted_cubic: float | None = None


@dataclass
class BatchRates:
    """Everything computed on one batch. All per-group tensors are ``(S,)`` float64.

    Attributes:
        g_hat, h_bar: the reduced gradient ``(S,)`` and curvature ``(S, S)``.
        h_bar_eigenvalues: ``(S,)`` ascending; ``h_bar_positive_definite`` says whether all are above the
            rounding tolerance.
        h_bar_correlation: ``(S, S)`` ``H_bar_st / sqrt(|H_bar_ss H_bar_tt|)`` (``nan`` where a diagonal is 0).
        newton_eta: the joint solution ``(H_bar + ridge I)^{-1} g_hat`` (may have negative entries), or None.
        lr_newton: ``newton_eta`` where positive, ``nan`` elsewhere (never a negative or infinite rate).
        lr_stability: ``2/lambda_max(G_PP)`` per group; ``lambda_max`` the block eigenvalues.
        recommended, rules: see :func:`~curvscope.curvature.lr.rules.recommend_rates`; ``halvings``: how often
            the loss check halved them.
        joint_sharpness: ``lambda_max(R^1/2 G R^1/2)`` of the recommended rates R (per parameter): their step is
            stable on the GGN's quadratic model while it is below 2 (the rates were scaled down to 2 when
            above); ``nan`` without stability bounds or along another direction than the gradient.
        d3, cubic_eta: order-3 diagonal and the minimizer of the cubic-regularized model (``cubic``);
            ``lr_cubic``: ``cubic_eta`` where positive, ``nan`` elsewhere.
        steps: rate-set name -> :class:`StepCheck`.
    """

    __repr__ = compact_repr

    batch_indices: list[int] | None
    loss_before: float
    g_hat: Tensor
    h_bar: Tensor
    h_bar_eigenvalues: Tensor
    h_bar_positive_definite: bool
    h_bar_correlation: Tensor
    newton_eta: Tensor | None
    newton_note: str
    lr_newton: Tensor
    lr_diag: Tensor
    diag_notes: list[str]
    lambda_max: Tensor
    lr_stability: Tensor
    lambda_max_global: float
    lr_stability_global: float
    recommended: Tensor
    rules: list[str]
    halvings: int
    joint_sharpness: float = math.nan
    d3: Tensor | None = None
    cubic_eta: Tensor | None = None
    lr_cubic: Tensor | None = None
    cubic_note: str | None = None
    steps: dict[str, StepCheck] = field(default_factory=dict)


@dataclass
class RateStats:
    """Mean and std (N-1) of one rate over the batches where it exists.

    Attributes:
        mean, std: ``(S,)`` each (``nan`` where no batch, or one, gave a finite rate).
        noisy: per group, ``std > mean``.
        count: per group, how many batches gave a finite rate.
    """

    __repr__ = compact_repr

    mean: Tensor
    std: Tensor
    noisy: list[bool]
    count: list[int]


@dataclass
class LRResult:
    """Per-group learning rates: the main batch (the problem's own) first, then the other batches."""

    __repr__ = compact_repr

    partition: str
    curvature: str
    direction: str
    ridge: float
    groups: list[ParamGroup]
    num_params: list[int]
    batches: list[BatchRates]
    holdout_size: int = 0
    cubic_weight: float | None = None
    path: str | None = None
    """How the products were differentiated (:attr:`curvscope.problem.Problem.path`)."""

    @property
    def main(self) -> BatchRates:
        """The rates of the problem's own batch."""
        return self.batches[0]

    def statistics(self) -> dict[str, RateStats]:
        """Statistics of every rate over the batches.

        Returns:
            Rate name (``lr_newton``, ``lr_diag``, ``lr_stability``, ``recommended``, ``lr_cubic``) -> stats.
        """
        names = ["lr_newton", "lr_diag", "lr_stability", "recommended"]
        if self.main.lr_cubic is not None:
            names.append("lr_cubic")
        out = {}
        for name in names:
            stack = torch.stack([getattr(b, name) if getattr(b, name) is not None
                                 else torch.full((len(self.groups),), math.nan, dtype=torch.float64)
                                 for b in self.batches])  # (B, S)
            out[name] = rate_stats(stack)
        return out


def rate_stats(values: Tensor) -> RateStats:
    """Stats of ``values`` ``(B, S)`` per column, ignoring ``nan`` entries."""
    B, S = values.shape
    mean = torch.full((S,), math.nan, dtype=torch.float64)
    std = torch.full((S,), math.nan, dtype=torch.float64)
    noisy, count = [], []
    for s in range(S):
        col = values[:, s][torch.isfinite(values[:, s])].to(torch.float64)
        count.append(int(col.numel()))
        if col.numel():
            mean[s] = col.mean()
        if col.numel() > 1:
            std[s] = col.std(unbiased=True)
        noisy.append(bool(col.numel() > 1 and float(std[s]) > float(mean[s])))
    return RateStats(mean=mean, std=std, noisy=noisy, count=count)
