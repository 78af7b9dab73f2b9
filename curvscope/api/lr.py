"""``curvscope.suggest_lr``: per-group learning rates from the reduced Hessian, checked by taking the step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvscope.api._problem import as_problem

if TYPE_CHECKING:
    from curvscope.curvature.lr import LRResult
    from curvscope.problem import Problem
    from curvscope.progress import Progress


def suggest_lr(model_or_problem: nn.Module | Problem, inputs: Any = None, targets: Tensor | None = None, *,
               loss: str | None = None, partition: str = "layer", curvature: str = "hessian",
               direction: str = "gradient", ridge: float = 0.0, batches: int = 1, holdout: int = 0,
               cubic: bool = False, cubic_weight: float = 1.0, stability: bool = True,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               progress: Progress | None = None) -> LRResult:
    """Per-group learning rates: what ``curvscope lr-suggest`` computes, without the files.

    Along a step direction ``u`` split into S parameter groups ``u_s``, the reduced gradient
    ``g_hat_s = g^T u_s`` and the reduced curvature ``H_bar_st = u_s^T H u_t`` give the joint Newton rates
    ``eta = H_bar^-1 g_hat``, the per-group diagonal rates ``g_hat_s / H_bar_ss`` and, with ``stability``, the
    bounds ``2 / lambda_max`` of each group's GGN; every rate set is checked by re-evaluating the loss after the
    step (``docs/conventions.md`` §6).

    Args:
        model_or_problem: a :class:`~curvscope.problem.Problem`, or an ``nn.Module`` together with ``inputs``
            and ``targets`` (see :func:`curvscope.spectrum`).
        inputs: with a model: the batch inputs.
        targets: with a model: the batch targets.
        loss: with a model: a loss name (``"ce"``, ``"mse"``, ``"bce"``, ``"nll"``, ``"huber"``, ``"smooth-l1"``),
            a :class:`~curvscope.losses.Loss` (:func:`~curvscope.losses.get_loss`) or a user loss function.
        partition: the groups, one rate each: ``"layer"`` (one per module with parameters), ``"tensor"`` or
            ``"all"``.
        curvature: ``H`` in ``H_bar``: ``"hessian"`` (may be indefinite) or ``"ggn"`` (positive semi-definite).
        direction: ``u``: ``"gradient"`` (plain SGD) or ``"symo"`` (the SymO direction).
        ridge: added to ``H_bar``'s diagonal for the joint Newton rates (``>= 0``).
        batches: the problem's batch and ``batches - 1`` further disjoint batches of its dataset (mean and spread
            of every rate; needs a Problem that knows its dataset, e.g. from :func:`curvscope.load_problem`).
        holdout: also measure each step's realized loss change on this many other samples.
        cubic: also the order-3 diagonal and the cubic-regularized rates.
        cubic_weight: the weight of the cubic term (``> 0``).
        stability: the stability bounds (one GGN spectrum pass per batch); without them the recommended rule has
            no cap.
        device: with a model: the device (default ``cuda`` when available).
        dtype: with a model: ``torch.float32`` or ``torch.float64``; default: float64 on the CPU up to 10M
            parameters, float32 above and on a GPU.
        progress: ``progress(stage, done, total)`` (:mod:`curvscope.progress`).

    Returns:
        An :class:`~curvscope.curvature.lr.LRResult`: ``result.groups`` (the parameter groups),
        ``result.main`` (the problem's own batch: ``recommended`` ``(S,)`` one rate per group, ``lr_newton``,
        ``lr_diag``, ``lr_stability``, ``g_hat``, ``h_bar``, and ``steps``: each rate set's realized loss
        change), ``result.batches`` (every batch) and ``result.statistics()`` over the batches.

    Raises:
        CurvscopeError: bad input or non-finite numbers (the message names the parameter or the stage).

    Example::

        rates = curvscope.suggest_lr(model, x, y, loss="ce", dtype=torch.float64)
        for group, eta in zip(rates.groups, rates.main.recommended.tolist()):
            print(group.name, eta)
    """
    from curvscope.workflows.lr import LrOptions, run_lr

    options = LrOptions(partition=partition, direction=direction, curvature=curvature, ridge=ridge,
                        batches=batches, holdout=holdout, cubic=cubic, cubic_weight=cubic_weight,
                        stability=stability, plot=False)
    options.validate()
    problem = as_problem("suggest_lr", model_or_problem, inputs, targets, loss=loss, device=device, dtype=dtype)
    return run_lr(problem, options, progress)
