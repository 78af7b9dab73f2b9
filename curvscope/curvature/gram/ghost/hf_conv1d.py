"""The Hugging Face ``Conv1D`` rule (GPT-2's projections): a Linear whose weight is stored ``(in, out)``."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from curvscope.curvature.gram.ghost.linear import LinearRule


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored ``(in, out)``. Known by
    name and shape, not imported (transformers is optional); the per-sample check confirms the rule."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


class HFConv1DRule(LinearRule):
    """Hugging Face's ``Conv1D``, ``y = x W + b``: a Linear with a transposed weight."""

    kind: ClassVar[str] = "Conv1D"
    transposed: ClassVar[bool] = True

    def matches(self, module: nn.Module) -> bool:
        """A Hugging Face ``Conv1D`` (:func:`is_hf_conv1d`)."""
        return is_hf_conv1d(module)
