"""Losses exactly as PyTorch's ``reduction="mean"`` losses, with per-sample values and Hessian square roots.

Conventions (``CURVATURE.md`` section 1): the batch loss is ``L = (1/N) sum_n l_n``; ``H_n`` is the Hessian
of the per-sample loss ``l_n`` with respect to the model output ``f_n`` (C entries), and a square root
``S_n`` satisfies ``H_n = S_n S_n^T``.

======  ==============================  ================================  ===============================
loss    per-sample loss l_n             Hessian H_n                       square root S_n
======  ==============================  ================================  ===============================
ce      -log softmax(f_n)[y_n]          diag(p) - p p^T                   diag(sqrt p) - p sqrt(p)^T
mse     (1/C) ||f_n - y_n||^2           (2/C) I                           sqrt(2/C) I
bce     (1/C) sum_c bce(f_nc, y_nc)     diag(s(1-s)) / C                  diag(sqrt(s(1-s)/C))
======  ==============================  ================================  ===============================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from curvscope.errors import CurvscopeError

LOSS_NAMES = ("ce", "mse", "bce")


@dataclass(frozen=True)
class Loss:
    """A loss in curvscope's conventions. Use :func:`get_loss` to obtain one."""

    name: str

    # -- values -------------------------------------------------------------------------------------
    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample losses ``l_n``, shape ``(N,)``, from outputs ``(N, C)``."""
        if self.name == "ce":
            return F.cross_entropy(outputs, targets, reduction="none")
        if self.name == "mse":
            return ((outputs - targets) ** 2).mean(dim=-1)
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(dim=-1)

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The batch loss ``L``: equal to ``torch.nn.<Loss>(reduction="mean")``."""
        return self.per_sample(outputs, targets).mean()

    def torch_module(self) -> torch.nn.Module:
        """The PyTorch loss module this loss reproduces (used by tests and by users as a reference)."""
        return {
            "ce": torch.nn.CrossEntropyLoss,
            "mse": torch.nn.MSELoss,
            "bce": torch.nn.BCEWithLogitsLoss,
        }[self.name](reduction="mean")

    def output_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``d l_n / d f_n``, shape ``(N, C)``: the per-sample gradient with respect to the outputs."""
        if self.name == "ce":
            p = outputs.softmax(dim=-1)
            return p - F.one_hot(targets, outputs.shape[-1]).to(p.dtype)
        C = outputs.shape[-1]
        if self.name == "mse":
            return 2.0 / C * (outputs - targets)
        return (torch.sigmoid(outputs) - targets) / C

    # -- curvature ----------------------------------------------------------------------------------
    def hessian_sqrt(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Exact square root of the loss Hessian, shape ``(N, C, C)``: ``H_n = S_n S_n^T``.

        Column ``c`` of ``S_n`` is ``s_nc``; backpropagating it gives ``J_n^T s_nc``.
        """
        outputs = outputs.detach()
        N, C = outputs.shape
        if self.name == "ce":
            p = outputs.softmax(dim=-1)
            sqrt_p = p.sqrt()
            return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
        if self.name == "mse":
            eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
            return math.sqrt(2.0 / C) * eye.expand(N, C, C).clone()
        s = torch.sigmoid(outputs)
        return torch.diag_embed((s * (1 - s) / C).sqrt())

    def hessian(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss Hessian ``H_n``, shape ``(N, C, C)`` (closed form; tests compare it to autograd)."""
        S = self.hessian_sqrt(outputs, targets)
        return S @ S.transpose(-1, -2)

    def mc_sqrt(self, outputs: Tensor, targets: Tensor, mc_samples: int,
                generator: torch.Generator | None = None) -> Tensor:
        """Monte-Carlo square root, shape ``(N, C, M)``, with ``E[S S^T] = H_n``.

        ``ce``: ``s_m = (onehot(y_m) - p) / sqrt(M)`` with ``y_m ~ Categorical(p)``;
        ``mse``: ``s_m = sqrt(2/C) z_m / sqrt(M)`` with ``z_m ~ N(0, I)``;
        ``bce``: ``s_m = (b_m - s) / sqrt(C M)`` with ``b_mc ~ Bernoulli(s_c)``.
        Random numbers are drawn on the CPU from ``generator`` so that results do not depend on the device.
        """
        if mc_samples < 1:
            raise CurvscopeError(f"--mc-samples must be at least 1, got {mc_samples}")
        outputs = outputs.detach()
        N, C = outputs.shape
        M = mc_samples
        cpu = outputs.to("cpu", torch.float64)
        if self.name == "ce":
            p = cpu.softmax(dim=-1)
            draws = torch.multinomial(p, M, replacement=True, generator=generator)  # (N, M)
            onehot = F.one_hot(draws, C).to(p.dtype).transpose(1, 2)  # (N, C, M)
            S = (onehot - p.unsqueeze(-1)) / math.sqrt(M)
        elif self.name == "mse":
            z = torch.randn(N, C, M, generator=generator, dtype=torch.float64)
            S = math.sqrt(2.0 / C) * z / math.sqrt(M)
        else:
            s = torch.sigmoid(cpu).unsqueeze(-1).expand(N, C, M)
            b = torch.bernoulli(s, generator=generator)
            S = (b - s) / math.sqrt(C * M)
        return S.to(outputs.device, outputs.dtype)

    def hessian_rank_per_sample(self, num_outputs: int) -> int:
        """Upper bound on ``rank(H_n)``: ``C - 1`` for ``ce`` (softmax is shift invariant), else ``C``."""
        return num_outputs - 1 if self.name == "ce" else num_outputs

    # -- validation ---------------------------------------------------------------------------------
    def prepare_targets(self, targets: Tensor, num_outputs: int, dtype: torch.dtype, source: str = "targets"
                        ) -> Tensor:
        """Check targets against this loss and the model's output size; return them in the right dtype.

        Raises :class:`CurvscopeError` with a one-line message naming ``source`` when they do not fit.
        """
        C = num_outputs
        N = targets.shape[0]
        if self.name == "ce":
            if targets.is_floating_point() or targets.is_complex():
                raise CurvscopeError(
                    f"{source}: loss 'ce' needs integer class labels, got {_dtype_name(targets)} targets "
                    "(use --loss mse or --loss bce for float targets)")
            if targets.dim() == 2 and targets.shape[1] == 1:
                targets = targets[:, 0]
            if targets.dim() != 1:
                raise CurvscopeError(
                    f"{source}: loss 'ce' needs one class label per sample, got targets of shape "
                    f"{tuple(targets.shape)}")
            if N and (int(targets.min()) < 0 or int(targets.max()) >= C):
                raise CurvscopeError(
                    f"{source}: class labels must lie in [0, {C}) for a model with {C} outputs, found "
                    f"labels in [{int(targets.min())}, {int(targets.max())}]")
            return targets.long()
        if targets.dtype == torch.bool or not targets.is_floating_point():
            targets = targets.to(dtype)
        if targets.dim() == 1 and C == 1:
            targets = targets.unsqueeze(-1)
        if tuple(targets.shape[1:]) != (C,):
            raise CurvscopeError(
                f"{source}: loss '{self.name}' needs targets of shape (N, {C}) to match the model's {C} "
                f"outputs, got {tuple(targets.shape)}")
        if not torch.isfinite(targets).all():
            raise CurvscopeError(f"{source}: targets contain NaN or Inf")
        if self.name == "bce" and (targets.min() < 0 or targets.max() > 1):
            raise CurvscopeError(f"{source}: loss 'bce' needs targets in [0, 1]")
        return targets.to(dtype)


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def get_loss(name: str) -> Loss:
    """The loss called ``name`` (``"ce"``, ``"mse"`` or ``"bce"``)."""
    if name not in LOSS_NAMES:
        raise CurvscopeError(f"unknown loss '{name}': choose one of {', '.join(LOSS_NAMES)}")
    return Loss(name)


def default_loss_name(targets: Tensor) -> str:
    """``ce`` for integer targets, ``mse`` for float targets."""
    return "mse" if targets.is_floating_point() else "ce"
