"""One module of the model handled by a fast rule: :class:`GhostLayer` (its rule, parameters, shapes and mode)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from curvscope.curvature.gram.ghost.base import GhostRule
from curvscope.curvature.gram.ghost.registry import rule_for


@dataclass
class GhostLayer:
    """A layer handled by its kind's fast rule.

    Attributes:
        module_name: its name in ``model.named_modules()``; weight, bias: the parameter names handled
            (or None).
        positions: T; d_in: input features per position (``C_in * prod(kernel)`` for a convolution, the
            vocabulary for an embedding); d_out.
        out_shape: the layer's output shape for one sample (for the probe).
        mode: ``ghost`` (products of inputs and deltas) or ``materialize`` (per-column weight rows).
        rule: the :class:`~curvscope.curvature.gram.ghost.base.GhostRule` of its kind (default: looked up in
            :data:`~curvscope.curvature.gram.ghost.registry.RULES`).
    """

    module_name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    positions: int = 0
    d_in: int = 0
    d_out: int = 0
    out_shape: tuple[int, ...] = ()
    mode: str = "materialize"
    rule: GhostRule | None = None
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.names = tuple(n for n in (self.weight, self.bias) if n is not None)
        if self.rule is None:
            self.rule = rule_for(self.module)
            if self.rule is None:
                raise ValueError(f"no ghost rule for {type(self.module).__name__} module {self.module_name!r}")

    @property
    def ghost_width(self) -> int:
        """Numbers per input position the ghost products hold and multiply: ``d_in``, or 1 for an embedding
        (a token id stands for its one-hot row)."""
        return self.rule.ghost_width(self.d_in)
