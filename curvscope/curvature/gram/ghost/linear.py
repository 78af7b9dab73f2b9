"""The ``nn.Linear`` rule: ``y = W x + b`` on the last dim, the leading dims after the batch being its T positions."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from curvscope.curvature.gram.ghost.base import GhostRule


class LinearRule(GhostRule):
    """``nn.Linear`` (and its subclasses): input ``(b, *positions, d_in)``, output ``(b, *positions, d_out)``."""

    kind: ClassVar[str] = "Linear"

    def matches(self, module: nn.Module) -> bool:
        """An ``nn.Linear``."""
        return isinstance(module, nn.Linear)

    def accepts(self, module: nn.Module, x: Tensor, out: Tensor) -> bool:
        """At least ``(b, d_in)``, with the output's leading dims the input's."""
        return x.dim() >= 2 and out.shape[:-1] == x.shape[:-1]

    def inputs(self, module: nn.Module, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``(b, ..., d_in)`` -> ``(b, T, d_in)``, the leading dims flattened."""
        return x.reshape(x.shape[0], -1, x.shape[-1])
