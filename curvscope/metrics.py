"""The metric that fits each loss, for the batch summary of ``curvscope info`` (``docs/loading.md``).

=================================  =====================================================================
loss                               metric
=================================  =====================================================================
``ce`` (logits), ``nll``           accuracy: argmax of the outputs equals the label (per valid token for
(log-probabilities)                sequences; unweighted, also with class weights)
``bce`` (logits)                   binary accuracy at threshold 0.5: sigmoid(f) > 0.5, i.e. f > 0, against
                                   the target label y > 0.5 (soft targets are rounded), over every entry
``mse``, ``huber``, ``smooth-l1``  RMSE = sqrt(mean (f - y)^2) over every entry, and
                                   R^2 = 1 - sum (f - y)^2 / sum (y - ybar)^2, ybar each output's mean over
                                   the batch (every token for sequences); undefined for constant targets
a user loss (``file.py:fn``)       none: curvscope does not know what its outputs and targets mean
=================================  =====================================================================

Everything is computed in float64 from the outputs the batch loss was computed from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

REGRESSION = ("mse", "huber", "smooth-l1")


@dataclass(frozen=True)
class Metric:
    """One metric of the batch.

    Attributes:
        name: the row label (``batch accuracy``, ``batch binary accuracy``, ``batch RMSE``, ``batch R²``,
            ``batch metric``).
        value: the number (accuracies as fractions), or ``None`` when it is undefined or there is none.
        text: the value as ``info`` prints it, with what it was computed over.
    """

    name: str
    value: float | None
    text: str


def batch_metrics(loss, outputs: Tensor, targets: Tensor) -> list[Metric]:
    """The metrics that fit ``loss`` (a :class:`~curvscope.losses.Loss`) on ``outputs`` (as the problem's
    forward returns them: ``(N, C)``, or ``(N, T*C)`` for sequences) and ``targets`` (module docstring)."""
    if loss.user is not None:
        return [Metric("batch metric", None, f"none: curvscope knows no metric for the user loss {loss.name} (it "
                       "does not know what the outputs and targets mean)")]
    outputs = outputs.detach().to(torch.float64)
    if loss.is_categorical:
        return [_accuracy(loss, outputs, targets)]
    f = outputs.reshape(targets.shape)
    y = targets.detach().to(torch.float64)
    if loss.name == "bce":
        labels = y > 0.5
        acc = float(((f > 0) == labels).to(torch.float64).mean())
        soft = bool(((y != 0) & (y != 1)).any())
        note = "; soft targets rounded at 0.5" if soft else ""
        return [Metric("batch binary accuracy", acc, f"{acc:.2%} of {y.numel():,} labels (sigmoid > 0.5{note})")]
    if loss.name in REGRESSION:
        return _regression(f, y)
    return []


def _accuracy(loss, outputs: Tensor, targets: Tensor) -> Metric:
    unweighted = " (unweighted)" if loss.class_weights is not None else ""
    if loss.is_sequence:
        n = targets.shape[0]
        predicted = outputs.reshape(n, loss.positions, loss.classes).argmax(dim=-1)
        valid = loss.valid_tokens(targets)
        if not bool(valid.any()):
            return Metric("batch accuracy", None, "n/a: no valid token")
        acc = float((predicted == targets)[valid].to(torch.float64).mean())
        return Metric("batch accuracy", acc, f"{acc:.2%} of valid tokens{unweighted}")
    acc = float((outputs.argmax(dim=-1) == targets).to(torch.float64).mean())
    return Metric("batch accuracy", acc, f"{acc:.2%}{unweighted}")


def _regression(f: Tensor, y: Tensor) -> list[Metric]:
    sse = float((f - y).pow(2).sum())
    rmse = math.sqrt(sse / max(y.numel(), 1))
    per_output = y.reshape(-1, y.shape[-1]) if y.dim() > 1 else y.reshape(-1, 1)
    sst = float((per_output - per_output.mean(0)).pow(2).sum())
    out = [Metric("batch RMSE", rmse, f"{rmse:.6g}")]
    if sst > 0 and math.isfinite(sst):
        r2 = 1 - sse / sst
        out.append(Metric("batch R²", r2, f"{r2:.4f} (1 - SSE/SST about each output's batch mean)"))
    else:
        out.append(Metric("batch R²", None, "n/a: the targets are constant over the batch"))
    return out
