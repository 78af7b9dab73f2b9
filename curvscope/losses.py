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

Also ``nll`` (on log-probabilities), ``huber``, ``smooth-l1``, label smoothing and class weights for ``ce``
(:mod:`curvscope.loss_kinds` has their formulas), and a user loss (:mod:`curvscope.user_loss`).

Sequence outputs (``docs/conventions.md`` §8): a loss with ``positions = T`` and ``classes = C`` takes outputs
flattened to ``(N, T*C)`` (the Problem flattens ``(N, T, C)``) and targets ``(N, T)`` (``ce``, ``-100`` marks a
token without loss) or ``(N, T, C)`` (``mse``/``bce``). The loss is PyTorch's mean over the valid tokens, and a
sample stays a sequence: ``l_n = (N/|T|) sum_{t valid} l_nt`` with ``|T|`` the valid tokens of the *whole batch*
(``token_scale = N/|T|``, fixed per batch by :meth:`Loss.for_batch`; a chunk of the batch keeps it). The Hessian
square root is block-diagonal over tokens, ``sqrt(N/|T|) S_nt``; the columns of ignored tokens are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from curvscope import loss_kinds
from curvscope.errors import CurvscopeError, OptionError

LOSS_NAMES = ("ce", "mse", "bce", "nll", "huber", "smooth-l1")
"""The built-in losses; ``--loss file.py:fn`` (or a callable in Python) names a user loss instead."""
CATEGORICAL = loss_kinds.CATEGORICAL
"""Losses with class labels (``ce`` on logits, ``nll`` on log-probabilities)."""
IGNORE_INDEX = -100
"""Token labels equal to this carry no loss (PyTorch's and Hugging Face's ``ignore_index``)."""


@dataclass(frozen=True)
class Loss:
    """A loss in curvscope's conventions. Use :func:`get_loss` to obtain one.

    Attributes:
        name: one of :data:`LOSS_NAMES`, or a user loss's spec (``file.py:fn``).
        positions: T for sequence outputs (each sample's outputs flattened to ``T*C``), 0 for one output vector
            per sample.
        classes: C, outputs per position (sequence outputs only).
        token_scale: the batch's normalization (see :meth:`for_batch`): ``N/|T|`` for sequence outputs, with
            class weights ``N / sum w_{y}`` over the batch's (valid) labels; 1 otherwise.
        label_smoothing: ``ce`` only: PyTorch's ``label_smoothing`` (0 <= eps <= 1).
        class_weights: ``ce``/``nll`` only: PyTorch's ``weight``, one per class (weighted mean over the batch).
        delta: ``huber``'s delta, ``smooth-l1``'s beta.
        user: a user loss's function ``fn(outputs, targets) -> per-sample losses`` (:mod:`curvscope.user_loss`).
    """

    name: str
    positions: int = 0
    classes: int = 0
    token_scale: float = 1.0
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    delta: float = 1.0
    user: Callable[[Tensor, Tensor], Tensor] | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options().items())
        if not self.positions:
            return f"Loss({self.name!r}{options})"
        return (f"Loss({self.name!r}{options}, positions={self.positions}, classes={self.classes}, "
                f"token_scale={self.token_scale:.6g})")

    def options(self) -> dict[str, Any]:
        """The options that differ from the defaults (``label_smoothing``, ``class_weights``, ``delta``)."""
        out: dict[str, Any] = {}
        if self.label_smoothing:
            out["label_smoothing"] = self.label_smoothing
        if self.class_weights is not None:
            out["class_weights"] = list(self.class_weights)
        if self.name in ("huber", "smooth-l1"):
            out["delta" if self.name == "huber" else "beta"] = self.delta
        return out

    @property
    def is_categorical(self) -> bool:
        """Class labels as targets (``ce``, ``nll``)."""
        return self.name in CATEGORICAL

    @property
    def is_sequence(self) -> bool:
        """The loss is applied per position of sequence outputs (``positions > 0``)."""
        return self.positions > 0

    def token_loss(self) -> Loss:
        """The loss of one token (positions 0, unscaled): what each position's ``C`` outputs get."""
        return replace(self, positions=0, classes=0, token_scale=1.0)

    def sequence(self, positions: int, classes: int) -> Loss:
        """This loss on outputs with ``positions`` positions of ``classes`` entries each."""
        return replace(self, positions=positions, classes=classes)

    def valid_tokens(self, targets: Tensor) -> Tensor:
        """``(n, T)`` bool: the tokens that carry loss (``ce``/``nll``: target != -100; else all)."""
        if self.is_categorical and self.user is None:
            return targets != IGNORE_INDEX
        return torch.ones(targets.shape[:2], dtype=torch.bool, device=targets.device)

    def target_weights(self, targets: Tensor) -> Tensor:
        """The weight of each sample ``(N,)`` or token ``(N, T)`` in the batch's weighted mean: ``w_{y}`` with
        class weights, else 1; 0 for ignored tokens."""
        valid = self.valid_tokens(targets) if self.positions else torch.ones(targets.shape[0], dtype=torch.bool,
                                                                               device=targets.device)
        if self.class_weights is None:
            return valid.to(torch.float64)
        w = torch.tensor(self.class_weights, dtype=torch.float64, device=targets.device)
        return torch.where(valid, w[torch.where(valid, targets, torch.zeros_like(targets))], torch.zeros_like(w[0]))

    def for_batch(self, targets: Tensor) -> Loss:
        """This loss with the batch normalization of ``targets``: ``token_scale = N / sum of the target
        weights`` (``N/|T|`` for tokens; with class weights PyTorch's weighted mean ``sum w_y l / sum w_y``).
        Unchanged for one output vector per sample without class weights, and for a user loss.

        Raises :class:`CurvscopeError` when no token of the batch carries loss (or every weight is zero).
        """
        if self.user is not None or (not self.positions and self.class_weights is None):
            return self
        total = float(self.target_weights(targets).sum())
        if total == 0:
            if self.positions and not bool(self.valid_tokens(targets).any()):
                raise CurvscopeError("no token of the batch carries loss: every target is -100 (ignore_index)")
            raise CurvscopeError("the class weights of the batch's labels are all zero: the weighted mean is "
                                 "undefined (PyTorch returns NaN)")
        return replace(self, token_scale=targets.shape[0] / total)

    def _tokens(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(n*T, C)`` outputs, ``(n*T, ...)`` targets and ``(n, T)`` valid mask."""
        n = outputs.shape[0]
        out = outputs.reshape(n * self.positions, self.classes)
        tgt = targets.reshape(n * self.positions, *targets.shape[2:])
        valid = self.valid_tokens(targets)
        if self.is_categorical:
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
        if self.user is not None:
            from curvscope.user_loss import user_values

            return user_values(self, outputs, targets)
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            per_token = self.token_loss().per_sample(out, tgt).reshape(valid.shape)
            per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
            return per_token.sum(1) * self.token_scale
        return loss_kinds.values(self, outputs, targets) * self.token_scale

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The batch loss ``L``: equal to ``torch.nn.<Loss>(reduction="mean")``."""
        return self.per_sample(outputs, targets).mean()

    def output_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``d l_n / d f_n``, shape ``(N, C)``: the per-sample gradient with respect to the outputs."""
        if self.user is not None:
            from curvscope.user_loss import user_gradient

            return user_gradient(self, outputs, targets)
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            g = self.token_loss().output_gradient(out, tgt).reshape(valid.shape[0], self.positions, self.classes)
            return (g * valid.unsqueeze(-1).to(g.dtype) * self.token_scale).reshape(outputs.shape)
        return loss_kinds.gradient(self, outputs, targets) * self.token_scale

    # -- curvature ----------------------------------------------------------------------------------
    def hessian_sqrt(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Exact square root of the loss Hessian, shape ``(N, C, C)``: ``H_n = S_n S_n^T``.

        Column ``c`` of ``S_n`` is ``s_nc``; backpropagating it gives ``J_n^T s_nc``.
        Sequence outputs: ``(N, T*C, T_v*C)``, block-diagonal ``sqrt(token_scale) S_nt`` over the valid tokens.
        """
        outputs = outputs.detach()
        if self.user is not None:
            from curvscope.user_loss import user_hessian_sqrt

            return user_hessian_sqrt(self, outputs, targets)
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            S = self.token_loss().hessian_sqrt(out, tgt) * math.sqrt(self.token_scale)
            return self._block_diagonal(S.reshape(*valid.shape, self.classes, self.classes), valid)
        S = loss_kinds.hessian_sqrt(self, outputs, targets)
        return S if self.token_scale == 1.0 else S * math.sqrt(self.token_scale)

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
        if self.user is not None:  # S_n z / sqrt(M), z ~ N(0, I): E[S z z^T S^T] = S S^T
            S = self.hessian_sqrt(outputs, targets)
            z = torch.randn(*S.shape[:2], mc_samples, generator=generator, dtype=torch.float64)
            return S @ z.to(S.device, S.dtype)[:, :S.shape[2]] / math.sqrt(mc_samples)
        if self.positions:
            out, tgt, valid = self._tokens(outputs, targets)
            S = self.token_loss().mc_sqrt(out, tgt, mc_samples, generator) * math.sqrt(self.token_scale)
            return self._block_diagonal(S.reshape(*valid.shape, self.classes, mc_samples), valid)
        S = loss_kinds.mc_sqrt(self, outputs, targets.detach(), mc_samples, generator)
        if self.token_scale != 1.0:
            S = S * math.sqrt(self.token_scale)
        return S.to(outputs.device, outputs.dtype)

    def hessian_product(self, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
        """``w -> (H_n w_n)_n`` for output-space vectors ``w`` ``(N, C)`` (``(N, T*C)`` for sequences), in closed
        form where the loss has one (no ``C x C`` matrices); a user loss by double backward."""
        outputs = outputs.detach()
        if self.user is not None:
            from curvscope.user_loss import user_hessian_product

            return user_hessian_product(self, outputs, targets)
        if self.positions:
            n, T, C = outputs.shape[0], self.positions, self.classes
            out, tgt, valid = self._tokens(outputs, targets)
            token = self.token_loss().hessian_product(out, tgt)
            weight = valid.reshape(n * T, 1).to(outputs.dtype) * self.token_scale
            return lambda w: (token(w.reshape(n * T, C)) * weight).reshape(w.shape)
        product = loss_kinds.hessian_product(self, outputs, targets)
        if self.token_scale == 1.0:
            return product
        return lambda w: product(w) * self.token_scale

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
        """Upper bound on ``rank(H_n)``: ``C - 1`` for ``ce``/``nll`` (softmax is shift invariant), else ``C``
        (per token times T for sequence outputs)."""
        if self.user is not None:
            return num_outputs
        if self.positions:
            return self.positions * self.token_loss().hessian_rank_per_sample(self.classes)
        return loss_kinds.rank_per_sample(self, num_outputs)

    # -- validation ---------------------------------------------------------------------------------
    def prepare_targets(self, targets: Tensor, num_outputs: int, dtype: torch.dtype, source: str = "targets"
                        ) -> Tensor:
        """Check targets against this loss and the model's output size; return them in the right dtype.

        Raises :class:`CurvscopeError` with a one-line message naming ``source`` when they do not fit.
        Sequence outputs (``positions`` set; ``num_outputs`` = T*C): ``ce`` labels ``(N, T)`` (or the position
        dims of the outputs, flattened) in ``[0, C)`` or ``-100``; ``mse``/``bce`` targets ``(N, T, C)``.
        """
        if self.user is not None:
            if targets.is_complex():
                raise CurvscopeError(f"{source}: complex targets are not supported")
            if targets.is_floating_point():
                if not torch.isfinite(targets).all():
                    raise CurvscopeError(f"{source}: targets contain NaN or Inf")
                return targets.to(dtype)
            return targets
        if self.positions:
            return self._prepare_sequence_targets(targets, dtype, source)
        C = num_outputs
        N = targets.shape[0]
        if self.is_categorical:
            if targets.is_floating_point() or targets.is_complex():
                raise _float_targets(source, "class", targets, self.name)
            if targets.dim() == 2 and targets.shape[1] == 1:
                targets = targets[:, 0]
            if targets.dim() != 1:
                raise CurvscopeError(
                    f"{source}: loss '{self.name}' needs one class label per sample, got targets of shape "
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
        if self.is_categorical:
            if targets.is_floating_point() or targets.is_complex():
                raise _float_targets(source, "token", targets, self.name)
            if targets[0].numel() != T:
                raise CurvscopeError(
                    f"{source}: loss '{self.name}' on outputs with {T} positions needs one label per position, got "
                    f"targets of shape {tuple(targets.shape)}")
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


def _float_targets(source: str, kind: str, targets: Tensor, loss: str = "ce") -> OptionError:
    """Loss ``ce`` (or ``nll``) refusing float targets, pointing to the losses that take them."""
    return OptionError("loss", lambda name: f"{source}: loss '{loss}' needs integer {kind} labels, got "
                       f"{_dtype_name(targets)} targets (use {name('loss', 'mse')} or {name('loss', 'bce')} for float "
                       "targets)")


def get_loss(name: str | Callable[[Tensor, Tensor], Tensor], *, label_smoothing: float = 0.0,
             class_weights: Sequence[float] | Tensor | None = None, huber_delta: float | None = None,
             smooth_l1_beta: float | None = None) -> Loss:
    """The loss called ``name``, exactly as PyTorch's ``reduction="mean"`` loss of that name and options.

    Args:
        name: ``"ce"`` (``CrossEntropyLoss``), ``"mse"``, ``"bce"`` (``BCEWithLogitsLoss``), ``"nll"``
            (``NLLLoss`` on log-probabilities), ``"huber"`` (``HuberLoss``), ``"smooth-l1"`` (``SmoothL1Loss``);
            a user loss ``"path/to/file.py:fn"`` / ``"package.module:fn"`` (imported: you named it), or the
            function itself: ``fn(outputs, targets)`` returning the per-sample losses ``(N,)`` whose mean is
            the batch loss (:mod:`curvscope.user_loss`).
        label_smoothing: ``ce`` only, ``0 <= eps <= 1``.
        class_weights: ``ce`` and ``nll`` only: one finite weight ``>= 0`` per class (PyTorch's ``weight``: the
            batch loss is ``sum_n w_{y_n} l_n / sum_n w_{y_n}``).
        huber_delta: ``huber`` only (default 1, ``> 0``).
        smooth_l1_beta: ``smooth-l1`` only (default 1, ``>= 0``; 0 is the L1 loss).

    Raises:
        CurvscopeError: an unknown loss; OptionError: an option out of range or given to a loss without it.
    """
    from curvscope.user_loss import user_function

    if callable(name) or (isinstance(name, str) and ":" in name):
        spec, fn = user_function(name)
        loss = Loss(spec, user=fn)
        _only(loss.name, label_smoothing=label_smoothing, class_weights=class_weights, huber_delta=huber_delta,
              smooth_l1_beta=smooth_l1_beta)
        return loss
    if name not in LOSS_NAMES:
        raise CurvscopeError(f"unknown loss '{name}': choose one of {', '.join(LOSS_NAMES)}, or a user loss "
                             "'path/to/file.py:fn'")
    allowed = {"ce": ("label_smoothing", "class_weights"), "nll": ("class_weights",), "huber": ("huber_delta",),
               "smooth-l1": ("smooth_l1_beta",)}.get(name, ())
    given = {"label_smoothing": label_smoothing, "class_weights": class_weights, "huber_delta": huber_delta,
             "smooth_l1_beta": smooth_l1_beta}
    _only(name, **{k: v for k, v in given.items() if k not in allowed})
    if not (isinstance(label_smoothing, int | float) and 0.0 <= label_smoothing <= 1.0):
        raise OptionError("label_smoothing", f"must be a number in [0, 1], got {label_smoothing!r}")
    delta = 1.0
    if huber_delta is not None:
        delta = _number("huber_delta", huber_delta, strict=True)
    if smooth_l1_beta is not None:
        delta = _number("smooth_l1_beta", smooth_l1_beta, strict=False)
    weights = None if class_weights is None else _class_weights(class_weights)
    return Loss(name, label_smoothing=float(label_smoothing), class_weights=weights, delta=delta)


def _only(name: str, **options: Any) -> None:
    """Refuse options that loss ``name`` does not have (``0``/``None``: not given)."""
    for option, value in options.items():
        if value is not None and not (option == "label_smoothing" and value == 0):
            raise OptionError(option, lambda flag, option=option: f"{flag(option)} does not apply to loss "
                              f"'{name}'")


def _number(option: str, value: Any, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
            or (strict and value == 0):
        raise OptionError(option, f"must be a finite number {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


def _class_weights(values: Sequence[float] | Tensor) -> tuple[float, ...]:
    items = values.reshape(-1).tolist() if isinstance(values, Tensor) else list(values)
    if not items or any(isinstance(v, bool) or not isinstance(v, int | float) for v in items):
        raise OptionError("class_weights", "must be a non-empty list of numbers, one per class")
    if any(not math.isfinite(v) or v < 0 for v in items):
        raise OptionError("class_weights", "must be finite and >= 0")
    if not any(v > 0 for v in items):
        raise OptionError("class_weights", "are all zero: the weighted mean is undefined")
    return tuple(float(v) for v in items)


def check_loss_outputs(loss: Loss, outputs: Tensor, source: str = "the model") -> None:
    """What a loss needs of the model's outputs (``(n, ..., C)``, a probe of a couple of samples): one class
    weight per class; ``nll``: log-probabilities (``logsumexp`` 0 over the classes).

    Raises:
        OptionError: of ``class_weights`` (wrong count) or ``loss`` (``nll`` on outputs that are not
            log-probabilities).
    """
    C = outputs.shape[-1]
    if loss.class_weights is not None and len(loss.class_weights) != C:
        raise OptionError("class_weights", f"{len(loss.class_weights)} class weights for a model with {C} "
                          "classes")
    if loss.name == "nll":
        lse = outputs.detach().to(torch.float64).reshape(-1, C).logsumexp(-1).abs()
        if lse.numel() and float(lse.max()) > 1e-3:
            raise OptionError("loss", lambda flag: f"loss 'nll' needs log-probabilities (log_softmax outputs), but "
                              f"{source}'s outputs exponentiate to sums up to {math.exp(float(lse.max())):.3g}, not "
                              f"1: use {flag('loss', 'ce')} for logits")


def default_loss_name(targets: Tensor) -> str:
    """``ce`` for integer targets, ``mse`` for float targets."""
    return "mse" if targets.is_floating_point() else "ce"
