"""The interface of a per-layer Gram rule: :class:`GhostRule`.

A rule describes one layer kind as ``y = W a + b`` applied at T positions of a sample: how to recognise such a
module (and when to refuse one), the input rows ``a`` ``(b, T, d_in)`` and output positions ``(.., T, d_out)`` of a
call, the per-sample weight gradient (for the check against autograd), what the ghost contraction takes of an input
and the products of two sets of inputs (``a_i a_j^T``). The defaults are those of a dense layer on floating-point
inputs; a kind overrides what differs (a convolution its patches, an embedding its token ids).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn


class GhostRule(ABC):
    """One layer kind's fast Gram rule (one instance per kind, in :data:`~.registry.RULES`).

    Attributes:
        kind: the kind's name (for messages and the registry's order).
        transposed: the weight is stored ``(d_in, d_out)`` (``y = x W + b``) rather than ``(d_out, d_in)``. The
            Gram does not depend on the order of a weight's entries; only the per-sample check transposes.
    """

    kind: ClassVar[str]
    transposed: ClassVar[bool] = False

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """``module`` is of this kind."""

    def refusal(self, module: nn.Module) -> str | None:
        """Why a module of this kind is left to the generic path (an option the rule cannot follow), or ``None``."""
        return None

    @abstractmethod
    def accepts(self, module: nn.Module, x: Tensor, out: Tensor) -> bool:
        """The call ``out = module(x)`` (batch first, floating-point ``x``) has the layout the rule expects."""

    @abstractmethod
    def inputs(self, module: nn.Module, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Layer input ``(b, ...)`` -> ``a`` ``(b, T, d_in)``; ``dtype``: of rows the rule builds itself."""

    def outputs(self, module: nn.Module, y: Tensor, lead: int) -> Tensor:
        """Output-shaped ``(*lead_dims, ...)`` with ``lead`` leading dims -> ``(*lead_dims, T, d_out)``."""
        return y.reshape(*y.shape[:lead], -1, y.shape[-1])

    def shapes(self, module: nn.Module, x: Tensor, out: Tensor) -> tuple[int, int, int] | None:
        """``(T, d_in, d_out)`` of the batch-first call ``out = module(x)``, or ``None`` when the rule cannot follow
        it (the layer is left to the generic path)."""
        if not x.is_floating_point() or not self.accepts(module, x, out):
            return None
        a = self.inputs(module, x)
        d = self.outputs(module, out, 1)
        if a.shape[1] != d.shape[1]:
            return None
        return a.shape[1], a.shape[2], d.shape[2]

    def ghost_width(self, d_in: int) -> int:
        """Numbers per input position that the ghost products hold and multiply (``d_in`` for dense inputs)."""
        return d_in

    def ghost_inputs(self, module: nn.Module, x: Tensor) -> dict[str, Tensor]:
        """What the ghost contraction takes of a layer input ``x`` ``(b, ...)``: ``a`` ``(b, T, d_in)``."""
        return {"a": self.inputs(module, x)}

    def input_gram(self, ai: Tensor, aj: Tensor, vi: Tensor | None, vj: Tensor | None, dtype: torch.dtype
                   ) -> Tensor:
        """``a_i a_j^T`` of inputs ``(p, d_in)`` and ``(q, d_in)`` (``vi``/``vj``: masks of inputs that get a
        gradient, where :meth:`ghost_inputs` gives them)."""
        return ai @ aj.T

    def sample_weight_gradients(self, module: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
        """Per-sample weight gradients ``(b, *weight)`` (up to the order of entries) of input ``x`` ``(b, ...)``
        and output gradients ``delta`` ``(b, T, d_out)``: ``sum_t delta_t a_t^T``."""
        a = self.inputs(module, x.detach())  # (b, T, d_in)
        return torch.einsum("bto,bti->bio" if self.transposed else "bto,bti->boi", delta, a)
