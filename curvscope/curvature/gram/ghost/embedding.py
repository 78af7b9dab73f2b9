"""The ``nn.Embedding`` rule: a Linear without bias on one-hot token inputs, which are never built.

``d_in`` is the vocabulary; a token id stands for its one-hot row, so the input products ``a_nt . a_ms`` of the
ghost contraction are the comparisons ``[x_nt == x_ms]`` (zero where a token is ``padding_idx``, which gets no
gradient) and the per-sample weight gradient is a scatter of the deltas into the rows of the tokens. Only the
materialized mode builds one-hot rows. ``max_norm`` (weights renormalized in the forward), ``scale_grad_by_freq``
(a sample's gradient depends on the batch) and sparse gradients are left to the generic path.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvscope.curvature.gram.ghost.base import GhostRule


class EmbeddingRule(GhostRule):
    """``nn.Embedding``: integer input ``(b, ...)`` (T = its positions), output ``(b, ..., embedding_dim)``."""

    kind: ClassVar[str] = "Embedding"

    def matches(self, module: nn.Module) -> bool:
        """An ``nn.Embedding``."""
        return isinstance(module, nn.Embedding)

    def refusal(self, module: nn.Module) -> str | None:
        """``max_norm``, ``scale_grad_by_freq`` or sparse gradients."""
        if module.max_norm is not None:
            return "max_norm renormalizes the weights in the forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq makes a sample's gradient depend on the batch"
        if module.sparse:
            return "sparse gradients"
        return None

    def accepts(self, module: nn.Module, x: Tensor, out: Tensor) -> bool:
        """Integer token ids ``(b, ...)`` and the output ``(b, ..., embedding_dim)``."""
        return not (x.is_floating_point() or x.is_complex()) and out.shape == (*x.shape, module.embedding_dim)

    def shapes(self, module: nn.Module, x: Tensor, out: Tensor) -> tuple[int, int, int] | None:
        """``(T, vocabulary, embedding_dim)``, T the positions of a sample's ids."""
        if not self.accepts(module, x, out):
            return None
        return x[0].numel(), module.num_embeddings, module.embedding_dim

    def ghost_width(self, d_in: int) -> int:
        """1: a token id stands for its one-hot row of ``d_in`` numbers."""
        return 1

    def tokens(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """Input ``(b, ...)`` -> token ids ``(b, T)`` and the mask of those that get a gradient (all but
        ``padding_idx``)."""
        ids = x.reshape(x.shape[0], -1)
        pad = module.padding_idx
        return ids, (ids != pad) if pad is not None else torch.ones_like(ids, dtype=torch.bool)

    def inputs(self, module: nn.Module, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """One-hot rows ``(b, T, vocabulary)`` in ``dtype`` (zero for padding tokens), for the materialized mode."""
        ids, valid = self.tokens(module, x)
        onehot = F.one_hot(ids, module.num_embeddings).to(dtype or torch.get_default_dtype())
        return onehot * valid.unsqueeze(-1).to(onehot.dtype)

    def ghost_inputs(self, module: nn.Module, x: Tensor) -> dict[str, Tensor]:
        """Token ids ``a`` ``(b, T)`` and their gradient mask ``valid``: they stand for the one-hot inputs."""
        ids, valid = self.tokens(module, x)
        return {"a": ids, "valid": valid}

    def input_gram(self, ai: Tensor, aj: Tensor, vi: Tensor | None, vj: Tensor | None, dtype: torch.dtype
                   ) -> Tensor:
        """The comparisons ``[x_i == x_j]`` of token ids ``(p,)``, ``(q,)``, zero where a token gets no gradient."""
        same = ai.reshape(-1, 1) == aj.reshape(1, -1)
        return (same & vi.reshape(-1, 1) & vj.reshape(1, -1)).to(dtype)

    def sample_weight_gradients(self, module: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
        """Row ``x_nt`` of sample n's gradient gets ``delta_nt``: a scatter ``(b, vocabulary, embedding_dim)``, no
        one-hot."""
        ids, valid = self.tokens(module, x)
        b, d_out = delta.shape[0], delta.shape[-1]
        return torch.zeros(b, module.num_embeddings, d_out, dtype=delta.dtype, device=delta.device).scatter_add_(
            1, ids.unsqueeze(-1).expand(*ids.shape, d_out), delta * valid.unsqueeze(-1).to(delta.dtype))
