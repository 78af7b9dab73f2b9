"""The formulas of each loss kind, for one output vector per sample (``docs/conventions.md`` §1).

:class:`~curvscope.losses.Loss` calls these with outputs ``(N, C)`` and targets ``(N,)`` or ``(N, C)`` and
multiplies by its batch scale (``token_scale``: ``N/|T|`` for tokens, ``N / sum_n w_{y_n}`` with class
weights). Everything here is *unscaled*: the class weights and the label smoothing are in, the batch's
normalization is not.

- categorical (``ce`` on logits, ``nll`` on log-probabilities): ``a_n (diag p - p p^T)`` with p the softmax of
  the outputs; ``a_n = (1 - eps) w_{y_n} + (eps/C) sum_c w_c`` for ``ce`` with label smoothing eps and class
  weights w (all ones without), ``a_n = w_{y_n}`` for ``nll``.
- element-wise (``mse``, ``bce``, ``huber``, ``smooth-l1``): ``l_n = (1/C) sum_c h(f_nc, y_nc)``, Hessian
  ``diag(h''(f_nc, y_nc)) / C``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CATEGORICAL = ("ce", "nll")
ELEMENTWISE = ("mse", "bce", "huber", "smooth-l1")


def _weights(loss, C: int, like: Tensor) -> Tensor:
    if loss.class_weights is None:
        return torch.ones(C, dtype=like.dtype, device=like.device)
    return torch.tensor(loss.class_weights, dtype=like.dtype, device=like.device)


def categorical_scale(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``a_n`` ``(N,)``: the factor of ``diag p - p p^T`` in sample n's loss Hessian (module docstring)."""
    w = _weights(loss, outputs.shape[-1], outputs)
    a = w[targets]
    if loss.name == "ce" and loss.label_smoothing:
        a = (1 - loss.label_smoothing) * a + loss.label_smoothing / outputs.shape[-1] * w.sum()
    return a


def values(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """Unscaled per-sample losses ``(N,)``."""
    C = outputs.shape[-1]
    if loss.name in CATEGORICAL:
        w = _weights(loss, C, outputs)
        logp = outputs if loss.name == "nll" else outputs.log_softmax(dim=-1)
        picked = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * w[targets]
        if loss.name == "ce" and loss.label_smoothing:
            eps = loss.label_smoothing
            return (1 - eps) * picked + eps / C * -(logp * w).sum(-1)
        return picked
    r = outputs - targets
    if loss.name == "mse":
        return (r ** 2).mean(dim=-1)
    if loss.name == "bce":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(dim=-1)
    if loss.name == "huber":
        return F.huber_loss(outputs, targets, reduction="none", delta=loss.delta).mean(dim=-1)
    return F.smooth_l1_loss(outputs, targets, reduction="none", beta=loss.delta).mean(dim=-1)


def gradient(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """Unscaled ``d l_n / d f_n`` ``(N, C)``."""
    C = outputs.shape[-1]
    if loss.name in CATEGORICAL:
        w = _weights(loss, C, outputs)
        target = F.one_hot(targets, C).to(outputs.dtype) * w[targets].unsqueeze(-1)
        if loss.name == "nll":
            return -target
        eps = loss.label_smoothing
        if eps:
            target = (1 - eps) * target + eps / C * w
        p = outputs.softmax(dim=-1)
        if loss.class_weights is None:  # a_n = 1
            return p - target
        return categorical_scale(loss, outputs, targets).unsqueeze(-1) * p - target
    r = outputs - targets
    if loss.name == "mse":
        return 2.0 / C * r
    if loss.name == "bce":
        return (torch.sigmoid(outputs) - targets) / C
    if loss.name == "huber":
        return r.clamp(-loss.delta, loss.delta) / C
    if loss.delta == 0:
        return torch.sign(r) / C
    return (r / loss.delta).clamp(-1.0, 1.0) / C


def curvature(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """Element-wise losses: ``h''(f_nc, y_nc) / C`` ``(N, C)``, the diagonal of the unscaled Hessian."""
    C = outputs.shape[-1]
    if loss.name == "mse":
        return torch.full_like(outputs, 2.0 / C)
    if loss.name == "bce":
        s = torch.sigmoid(outputs)
        return s * (1 - s) / C
    inside = ((outputs - targets).abs() <= loss.delta).to(outputs.dtype)
    if loss.name == "huber":
        return inside / C
    return inside / (C * loss.delta) if loss.delta > 0 else torch.zeros_like(outputs)


def hessian_sqrt(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """An unscaled square root ``S_n`` ``(N, C, C)`` of the loss Hessian."""
    if loss.name in CATEGORICAL:
        p = outputs.softmax(dim=-1)
        sqrt_p = p.sqrt()
        S = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
        if loss.class_weights is not None:  # else a_n = 1 (label smoothing keeps the softmax's Hessian)
            S = S * categorical_scale(loss, outputs, targets).sqrt()[:, None, None]
        return S
    if loss.name == "mse":
        N, C = outputs.shape
        eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
        return math.sqrt(2.0 / C) * eye.expand(N, C, C).clone()
    return torch.diag_embed(curvature(loss, outputs, targets).sqrt())


def mc_sqrt(loss, outputs: Tensor, targets: Tensor, M: int, generator: torch.Generator | None) -> Tensor:
    """An unscaled Monte-Carlo root ``(N, C, M)`` with ``E[S S^T] = H_n``, drawn on the CPU in float64."""
    N, C = outputs.shape
    cpu = outputs.to("cpu", torch.float64)
    if loss.name in CATEGORICAL:
        p = cpu.softmax(dim=-1)
        draws = torch.multinomial(p, M, replacement=True, generator=generator)  # (N, M)
        onehot = torch.zeros(N, M, C, dtype=p.dtype).scatter_(2, draws.unsqueeze(-1), 1.0)  # one_hot, in place
        S = onehot.transpose(1, 2).sub_(p.unsqueeze(-1)).div_(math.sqrt(M))  # (onehot - p) / sqrt(M), (N, C, M)
        if loss.class_weights is not None:
            S = S * categorical_scale(loss, cpu, targets.to("cpu")).sqrt()[:, None, None]
        return S
    if loss.name == "bce":
        s = torch.sigmoid(cpu).unsqueeze(-1).expand(N, C, M)
        b = torch.bernoulli(s, generator=generator)
        return (b - s) / math.sqrt(C * M)
    z = torch.randn(N, C, M, generator=generator, dtype=torch.float64)
    if loss.name == "mse":
        return math.sqrt(2.0 / C) * z / math.sqrt(M)
    diag = curvature(loss, cpu, targets.to("cpu", torch.float64))
    return diag.sqrt().unsqueeze(-1) * z / math.sqrt(M)


def hessian_product(loss, outputs: Tensor, targets: Tensor):
    """``w -> (H_n w_n)_n`` for ``w`` ``(N, C)``, unscaled, without forming ``C x C`` matrices."""
    if loss.name in CATEGORICAL:
        p = outputs.softmax(dim=-1)
        if loss.class_weights is None:
            return lambda w: p * w - p * (p * w).sum(dim=-1, keepdim=True)
        a = categorical_scale(loss, outputs, targets).unsqueeze(-1)
        return lambda w: a * (p * w - p * (p * w).sum(dim=-1, keepdim=True))
    diag = curvature(loss, outputs, targets)
    return lambda w: diag * w


def rank_per_sample(loss, C: int) -> int:
    """Upper bound on ``rank(H_n)``: ``C - 1`` for the categorical losses (softmax is shift invariant), else C."""
    return C - 1 if loss.name in CATEGORICAL else C
