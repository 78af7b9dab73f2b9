"""Per-group learning rates from the reduced Hessian (Wolinski; ``docs/conventions.md §6``).

Partition the parameters into S groups and pick a direction ``u`` (default the gradient ``g``). The step
``theta(eta) = theta - sum_s eta_s u_s`` (``u_s``: ``u`` restricted to group s) has the second-order model

    L(theta(eta)) ~ L(theta) - eta^T g_hat + 1/2 eta^T H_bar eta,
    g_hat_s = g_s^T u_s,   H_bar_st = u_s^T H u_t   (S x S),

where ``H`` is the Hessian (S batched Hessian-vector products) or the GGN (S batched Jacobian-vector
products). One concern per module:

- :mod:`.reduced`: ``g_hat``, ``H_bar``, the order-3 diagonal ``d3`` and the step ``theta(eta)``;
- :mod:`.rules`: joint Newton rates ``(H_bar + ridge I)^{-1} g_hat``, diagonal rates ``g_hat_s / H_bar_ss``,
  the predicted decrease and the ``recommended`` rate per group;
- :mod:`.cubic`: the cubic-regularized model of the paper and its minimizer;
- :mod:`.stability`: the bounds ``2 / lambda_max`` of each group's GGN block and of the whole GGN;
- :mod:`.batch`: all of it on one batch, every rate set checked by taking the step (predicted versus
  realized decrease);
- :mod:`.results`: the result dataclasses.

Several batches and a holdout drawn from the dataset are the application layer's
(:func:`curvscope.workflows.lr.run_lr`). Python use::

    from curvscope import suggest_lr
    result = suggest_lr(problem, partition="layer", curvature="hessian")
    result.main.recommended, result.main.rules
"""

from __future__ import annotations

from curvscope.curvature.lr.batch import DIRECTIONS, PARTITIONS, analyse_batch, resolve_direction
from curvscope.curvature.lr.cubic import cubic_model, cubic_rates
from curvscope.curvature.lr.reduced import (
    CURVATURES,
    group_tangents,
    reduced_gradient,
    reduced_hessian,
    step_params,
    third_order_diagonal,
)
from curvscope.curvature.lr.results import BatchRates, LRResult, RateStats, StepCheck, rate_stats
from curvscope.curvature.lr.rules import (
    ASCENT_FACTOR,
    FALLBACK_LR,
    MAX_HALVINGS,
    RECOMMENDED_RULE,
    diagonal_rates,
    newton_rates,
    predicted_decrease,
    recommend_rates,
)
from curvscope.curvature.lr.stability import stability_bounds

__all__ = [
    "ASCENT_FACTOR", "CURVATURES", "DIRECTIONS", "FALLBACK_LR", "MAX_HALVINGS", "PARTITIONS", "RECOMMENDED_RULE",
    "BatchRates", "LRResult", "RateStats", "StepCheck", "analyse_batch", "cubic_model", "cubic_rates",
    "diagonal_rates", "group_tangents", "newton_rates", "predicted_decrease", "rate_stats", "recommend_rates",
    "reduced_gradient", "reduced_hessian", "resolve_direction", "stability_bounds", "step_params",
    "third_order_diagonal",
]

