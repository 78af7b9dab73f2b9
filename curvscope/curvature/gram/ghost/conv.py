"""The ``nn.Conv1d`` / ``nn.Conv2d`` rule: a Linear on the unfolded patches, one position per output pixel.

``F.unfold`` turns the input ``(b, C_in, H, W)`` into patches ``(b, C_in * prod(kernel), T)`` (T output pixels)
whose product with the weight ``(C_out, C_in * prod(kernel))`` is the convolution; a Conv1d is a Conv2d of height
1. Padding ``same`` is applied as ATen does (the odd extra element at the end). Grouped convolutions and padding
modes other than zeros are left to the generic path.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvscope.curvature.gram.ghost.base import GhostRule


class ConvRule(GhostRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with zeros padding and one group: input ``(b, C_in, [H,] W)``."""

    kind: ClassVar[str] = "Conv"

    def matches(self, module: nn.Module) -> bool:
        """An ``nn.Conv1d`` or ``nn.Conv2d``."""
        return isinstance(module, nn.Conv1d | nn.Conv2d)

    def refusal(self, module: nn.Module) -> str | None:
        """Grouped convolutions and padding modes other than zeros."""
        if module.groups != 1:
            return f"{module.groups} groups"
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r}"
        return None

    def accepts(self, module: nn.Module, x: Tensor, out: Tensor) -> bool:
        """A batched input: ``(b, C_in, W)`` for a Conv1d, ``(b, C_in, H, W)`` for a Conv2d."""
        return x.dim() == (3 if isinstance(module, nn.Conv1d) else 4)

    def inputs(self, module: nn.Module, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The unfolded patches ``(b, T, C_in * prod(kernel))``."""
        m = module
        conv1d = isinstance(m, nn.Conv1d)
        if conv1d:
            x = x.unsqueeze(2)
        kernel, stride, dilation = ((1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)) if conv1d else (
            m.kernel_size, m.stride, m.dilation)
        if isinstance(m.padding, str):
            padding = (0, 0)
            if m.padding == "same":  # as ATen: the odd extra element goes to the end
                pads = []
                for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
        else:
            padding = (0, *m.padding) if conv1d else m.padding
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (b, d_in, T)
        return patches.transpose(1, 2)

    def outputs(self, module: nn.Module, y: Tensor, lead: int) -> Tensor:
        """``(*lead_dims, C_out, [H,] W)`` -> ``(*lead_dims, T, C_out)``."""
        return y.reshape(*y.shape[:lead + 1], -1).transpose(-1, -2)
