"""Losses exactly as PyTorch's ``reduction="mean"`` losses, with per-sample values and Hessian square roots.

Conventions (``docs/conventions.md`` §1): the batch loss is ``L = (1/N) sum_n l_n``; ``H_n`` is the Hessian
of the per-sample loss ``l_n`` with respect to the model output ``f_n`` (C entries), and a square root
``S_n`` satisfies ``H_n = S_n S_n^T``.

======  ==============================  ================================  ===============================
loss    per-sample loss l_n             Hessian H_n                       square root S_n
======  ==============================  ================================  ===============================
ce      -log softmax(f_n)[y_n]          diag(p) - p p^T                   diag(sqrt p) - p sqrt(p)^T
mse     (1/C) ||f_n - y_n||^2           (2/C) I                           sqrt(2/C) I
bce     (1/C) sum_c bce(f_nc, y_nc)     diag(s(1-s)) / C                  diag(sqrt(s(1-s)/C))
======  ==============================  ================================  ===============================

Sequence outputs (``docs/conventions.md`` §8): a loss with ``positions = T`` and ``classes = C`` takes outputs
flattened to ``(N, T*C)`` (the Problem flattens ``(N, T, C)``) and targets ``(N, T)`` (``ce``, ``-100`` marks a
token without loss) or ``(N, T, C)`` (``mse``/``bce``). The loss is PyTorch's mean over the valid tokens, and a
sample stays a sequence: ``l_n = (N/|T|) sum_{t valid} l_nt`` with ``|T|`` the valid tokens of the *whole batch*
(``token_scale = N/|T|``, fixed per batch by :meth:`Loss.for_batch`; a chunk of the batch keeps it). The Hessian
square root is block-diagonal over tokens, ``sqrt(N/|T|) S_nt``; the columns of ignored tokens are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from curvscope.errors import CurvscopeError, OptionError

LOSS_NAMES = ("ce", "mse", "bce")
IGNORE_INDEX = -100
"""Token labels equal to this carry no loss (PyTorch's and Hugging Face's ``ignore_index``)."""


@dataclass(frozen=True)
class Loss:
    """A loss in curvscope's conventions. Use :func:`get_loss` to obtain one.

    Attributes:
        name: ``ce``, ``mse`` or ``bce``.
        positions: T for sequence outputs (each sample's outputs flattened to ``T*C``), 0 for one output vector
            per sample.
        classes: C, outputs per position (sequence outputs only).
        token_scale: ``N/|T|`` of the batch this loss belongs to (sequence outputs only; see :meth:`for_batch`).
    """

    name: str
    positions: int = 0
    classes: int = 0
    token_scale: float = 1.0

    def __repr__(self) -> str:
        if not self.positions:
            return f"Loss({self.name!r})"
        return (f"Loss({self.name!r}, positions={self.positions}, classes={self.classes}, "
                f"token_scale={self.token_scale:.6g})")

    @property
    def is_sequence(self) -> bool:
        """The loss is applied per position of sequence outputs (``positions > 0``)."""
        return self.positions > 0

    def token_loss(self) -> Loss:
        """The loss of one token (positions 0): what each position's ``C`` outputs get."""
        return Loss(self.name)

    def sequence(self, positions: int, classes: int) -> Loss:
        """This loss on outputs with ``positions`` positions of ``classes`` entries each."""
        return replace(self, positions=positions, classes=classes)

    def valid_tokens(self, targets: Tensor) -> Tensor:
        """``(n, T)`` bool: the tokens that carry loss (``ce``: target != -100; else all)."""
        if self.name == "ce":
            return targets != IGNORE_INDEX
        return torch.ones(targets.shape[:2], dtype=torch.bool, device=targets.device)

    def for_batch(self, targets: Tensor) -> Loss:
        """This loss with the token scale ``N/|T|`` of the batch ``targets`` (unchanged without positions).

        Raises :class:`CurvscopeError` when no token of the batch carries loss.
        """
        if not self.positions:
            return self
        count = int(self.valid_tokens(targets).sum())
        if count == 0:
            raise CurvscopeError("no token of the batch carries loss: every target is -100 (ignore_index)")
        return replace(self, token_scale=targets.shape[0] / count)

    def _tokens(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(n*T, C)`` outputs, ``(n*T, ...)`` targets and ``(n, T)`` valid mask."""
        n = outputs.shape[0]
        out = outputs.reshape(n * self.positions, self.classes)
        tgt = targets.reshape(n * self.positions, *targets.shape[2:])
        valid = self.valid_tokens(targets)
        if self.name == "ce":
            tgt = torch.where(valid.reshape(-1), tgt, torch.zeros_like(tgt))
        return out, tgt, valid

    def _block_diagonal(self, blocks: Tensor, valid: Tensor) -> Tensor:
        """Per-token blocks ``(n, T, C, K)`` -> ``(n, T*C, T_v*K)``: block-diagonal over tokens, with the columns of
        the ignored tokens left out (``T_v`` = most valid tokens of a sample; a sample with fewer valid tokens
        gets zero columns at the end)."""
        n, T, C, K = blocks.shape
        blocks = blocks * valid[:, :, None, None].to(blocks.dtype)
        full = torch.zeros(n, T, C, T, K, dtype=blocks.dtype, device=blocks.device)
        full.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid tokens first
        Tv = max(int(valid.sum(1).max()), 1) if n else 0
        idx = order[:, :Tv].reshape(n, 1, 1, Tv, 1).expand(n, T, C, Tv, K)
        return full.gather(3, idx).reshape(n, T * C, Tv * K)

    # -- values -------------------------------------------------------------------------------------
    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample losses ``l_n``, shape ``(N,)``, from outputs ``(N, C)``.

        Sequence outputs: ``l_n = token_scale * sum_{t valid} l_nt`` from outputs ``(N, T*C)``.
        """
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            per_token = self.token_loss().per_sample(out, tgt).reshape(valid.shape)
            per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
            return per_token.sum(1) * self.token_scale
        if self.name == "ce":
            return F.cross_entropy(outputs, targets, reduction="none")
        if self.name == "mse":
            return ((outputs - targets) ** 2).mean(dim=-1)
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(dim=-1)

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The batch loss ``L``: equal to ``torch.nn.<Loss>(reduction="mean")``."""
        return self.per_sample(outputs, targets).mean()

    def output_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``d l_n / d f_n``, shape ``(N, C)``: the per-sample gradient with respect to the outputs."""
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            g = self.token_loss().output_gradient(out, tgt).reshape(valid.shape[0], self.positions, self.classes)
            return (g * valid.unsqueeze(-1).to(g.dtype) * self.token_scale).reshape(outputs.shape)
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
        Sequence outputs: ``(N, T*C, T_v*C)``, block-diagonal ``sqrt(token_scale) S_nt`` over the valid tokens.
        """
        outputs = outputs.detach()
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            S = self.token_loss().hessian_sqrt(out, tgt) * math.sqrt(self.token_scale)
            return self._block_diagonal(S.reshape(*valid.shape, self.classes, self.classes), valid)
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
        """The loss Hessian ``H_n``, shape ``(N, C, C)`` (closed form; tests compare it to autograd);
        ``(N, T*C, T*C)`` for sequence outputs."""
        S = self.hessian_sqrt(outputs, targets)
        return S @ S.transpose(-1, -2)

    def mc_sqrt(self, outputs: Tensor, targets: Tensor, mc_samples: int,
                generator: torch.Generator | None = None) -> Tensor:
        """Monte-Carlo square root, shape ``(N, C, M)``, with ``E[S S^T] = H_n``.

        ``ce``: ``s_m = (onehot(y_m) - p) / sqrt(M)`` with ``y_m ~ Categorical(p)``;
        ``mse``: ``s_m = sqrt(2/C) z_m / sqrt(M)`` with ``z_m ~ N(0, I)``;
        ``bce``: ``s_m = (b_m - s) / sqrt(C M)`` with ``b_mc ~ Bernoulli(s_c)``.
        Random numbers are drawn on the CPU from ``generator`` so that results do not depend on the device.
        Sequence outputs: M columns per valid token, ``(N, T*C, T_v*M)``, block-diagonal over tokens.
        """
        if mc_samples < 1:
            raise OptionError("mc_samples", f"must be at least 1, got {mc_samples}")
        outputs = outputs.detach()
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            S = self.token_loss().mc_sqrt(out, tgt, mc_samples, generator) * math.sqrt(self.token_scale)
            return self._block_diagonal(S.reshape(*valid.shape, self.classes, mc_samples), valid)
        N, C = outputs.shape
        M = mc_samples
        cpu = outputs.to("cpu", torch.float64)
        if self.name == "ce":
            p = cpu.softmax(dim=-1)
            del cpu  # a vocabulary of outputs per token: hold one float64 copy at a time
            draws = torch.multinomial(p, M, replacement=True, generator=generator)  # (N, M)
            onehot = torch.zeros(N, M, C, dtype=p.dtype).scatter_(2, draws.unsqueeze(-1), 1.0)  # one_hot, in place
            S = onehot.transpose(1, 2).sub_(p.unsqueeze(-1)).div_(math.sqrt(M))  # (onehot - p) / sqrt(M)
        elif self.name == "mse":
            z = torch.randn(N, C, M, generator=generator, dtype=torch.float64)
            S = math.sqrt(2.0 / C) * z / math.sqrt(M)
        else:
            s = torch.sigmoid(cpu).unsqueeze(-1).expand(N, C, M)
            b = torch.bernoulli(s, generator=generator)
            S = (b - s) / math.sqrt(C * M)
        return S.to(outputs.device, outputs.dtype)

    def token_blocks(self, outputs: Tensor, targets: Tensor, mc_samples: int = 0,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sequence outputs: the per-token blocks of :meth:`hessian_sqrt` (``mc_samples`` 0) or :meth:`mc_sqrt`
        without their block-diagonal matrix: ``(blocks, order)`` with ``blocks`` ``(n, T, C, K_t)`` (``K_t`` = C or
        M; ``sqrt(token_scale) S_nt``, zero at the ignored tokens; the same random draws as :meth:`mc_sqrt`) and
        ``order`` ``(n, T_v)``, the tokens of the column blocks, valid tokens first. Column ``v*K_t + j`` of the
        square root is ``blocks[n, order[n, v], :, j]`` at token ``order[n, v]`` and zero elsewhere."""
        outputs = outputs.detach()
        out, tgt, valid = self._tokens(outputs, targets)
        if mc_samples:
            S = self.token_loss().mc_sqrt(out, tgt, mc_samples, generator)
        else:
            S = self.token_loss().hessian_sqrt(out, tgt)
        n, T = valid.shape  # in place on the fresh root: the numbers of hessian_sqrt and mc_sqrt, less memory
        blocks = S.mul_(math.sqrt(self.token_scale)).reshape(n, T, self.classes, S.shape[-1])
        blocks.mul_(valid[:, :, None, None].to(S.dtype))
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid tokens first
        Tv = max(int(valid.sum(1).max()), 1) if n else 0
        return blocks, order[:, :Tv]

    def hessian_rank_per_sample(self, num_outputs: int) -> int:
        """Upper bound on ``rank(H_n)``: ``C - 1`` for ``ce`` (softmax is shift invariant), else ``C``
        (per token times T for sequence outputs)."""
        if self.positions:
            return self.positions * self.token_loss().hessian_rank_per_sample(self.classes)
        return num_outputs - 1 if self.name == "ce" else num_outputs

    # -- validation ---------------------------------------------------------------------------------
    def prepare_targets(self, targets: Tensor, num_outputs: int, dtype: torch.dtype, source: str = "targets"
                        ) -> Tensor:
        """Check targets against this loss and the model's output size; return them in the right dtype.

        Raises :class:`CurvscopeError` with a one-line message naming ``source`` when they do not fit.
        Sequence outputs (``positions`` set; ``num_outputs`` = T*C): ``ce`` labels ``(N, T)`` (or the position
        dims of the outputs, flattened) in ``[0, C)`` or ``-100``; ``mse``/``bce`` targets ``(N, T, C)``.
        """
        if self.positions:
            return self._prepare_sequence_targets(targets, dtype, source)
        C = num_outputs
        N = targets.shape[0]
        if self.name == "ce":
            if targets.is_floating_point() or targets.is_complex():
                raise _float_targets(source, "class", targets)
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


    def _prepare_sequence_targets(self, targets: Tensor, dtype: torch.dtype, source: str) -> Tensor:
        N, T, C = targets.shape[0], self.positions, self.classes
        if self.name == "ce":
            if targets.is_floating_point() or targets.is_complex():
                raise _float_targets(source, "token", targets)
            if targets[0].numel() != T:
                raise CurvscopeError(
                    f"{source}: loss 'ce' on outputs with {T} positions needs one label per position, got targets "
                    f"of shape {tuple(targets.shape)}")
            targets = targets.reshape(N, T).long()
            bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= C))
            if bool(bad.any()):
                v = targets[bad]
                raise CurvscopeError(
                    f"{source}: token labels must lie in [0, {C}) for {C} classes (or be {IGNORE_INDEX} to ignore "
                    f"a position), found labels in [{int(v.min())}, {int(v.max())}]")
            return targets
        if targets.dtype == torch.bool or not targets.is_floating_point():
            targets = targets.to(dtype)
        if targets[0].numel() != T * C:
            raise CurvscopeError(
                f"{source}: loss '{self.name}' needs targets of shape (N, {T}, {C}) to match the model's outputs, "
                f"got {tuple(targets.shape)}")
        targets = targets.reshape(N, T, C)
        if not torch.isfinite(targets).all():
            raise CurvscopeError(f"{source}: targets contain NaN or Inf")
        if self.name == "bce" and (targets.min() < 0 or targets.max() > 1):
            raise CurvscopeError(f"{source}: loss 'bce' needs targets in [0, 1]")
        return targets.to(dtype)


def shift_labels(targets: Tensor) -> Tensor:
    """Causal-LM labels: position t is scored against token t+1 (Hugging Face's ``logits[:, :-1]`` against
    ``labels[:, 1:]``): ``(N, T)`` labels shifted left, with -100 at the last position."""
    pad = torch.full_like(targets[:, :1], IGNORE_INDEX)
    return torch.cat([targets[:, 1:], pad], dim=1)


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _float_targets(source: str, kind: str, targets: Tensor) -> OptionError:
    """Loss ``ce`` refusing float targets, pointing to the losses that take them."""
    return OptionError("loss", lambda name: f"{source}: loss 'ce' needs integer {kind} labels, got "
                       f"{_dtype_name(targets)} targets (use {name('loss', 'mse')} or {name('loss', 'bce')} for float "
                       "targets)")


def get_loss(name: str) -> Loss:
    """The loss called ``name`` (``"ce"``, ``"mse"`` or ``"bce"``)."""
    if name not in LOSS_NAMES:
        raise CurvscopeError(f"unknown loss '{name}': choose one of {', '.join(LOSS_NAMES)}")
    return Loss(name)


def default_loss_name(targets: Tensor) -> str:
    """``ce`` for integer targets, ``mse`` for float targets."""
    return "mse" if targets.is_floating_point() else "ce"
