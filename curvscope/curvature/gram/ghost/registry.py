"""The one table of per-layer Gram rules: :data:`RULES`, and :func:`rule_for` to look a module up in it.

A new layer kind is one new module with a :class:`~.base.GhostRule` subclass and one entry here.
"""

from __future__ import annotations

from torch import nn

from curvscope.curvature.gram.ghost.base import GhostRule
from curvscope.curvature.gram.ghost.conv import ConvRule
from curvscope.curvature.gram.ghost.embedding import EmbeddingRule
from curvscope.curvature.gram.ghost.hf_conv1d import HFConv1DRule
from curvscope.curvature.gram.ghost.linear import LinearRule

RULES: tuple[GhostRule, ...] = (ConvRule(), EmbeddingRule(), HFConv1DRule(), LinearRule())
"""Every rule, one instance per layer kind. The first that matches a module is its rule: a more specific kind
comes before a kind it refines (Hugging Face's ``Conv1D`` before ``nn.Linear``)."""


def rule_for(module: nn.Module) -> GhostRule | None:
    """The rule of ``module``'s kind, or ``None`` (no fast rule: the generic path)."""
    return next((rule for rule in RULES if rule.matches(module)), None)
