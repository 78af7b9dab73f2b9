"""Fast per-layer Gram rules ("ghost" products) for nn.Linear, nn.Conv1d/2d, Hugging Face's Conv1D and
nn.Embedding (``docs/conventions.md`` §3), one rule per layer kind behind one interface, found through one table.

A layer ``y = W a + b`` applied at T positions of a sample (T = 1 for a plain Linear, the flattened leading
dims for sequences, the output pixels for a convolution through its unfolded patches) has, for column
``(n, c)`` of V, the weight rows ``v_nc = sum_t delta_nct a_nt^T`` and the bias rows ``sum_t delta_nct``,
where ``a_nt`` ``(d_in,)`` is the layer's input at position t and ``delta_nct`` ``(d_out,)`` the output
gradient backpropagated from seed c of sample n. Hence, without per-sample gradients,

    G~[(n,c),(m,d)] += sum_{t,s} (a_nt . a_ms)(delta_nct . delta_md,s)    (weight, "ghost" mode)
                     + (sum_t delta_nct) . (sum_s delta_mds)              (bias)

or, when T is large, ``v_nc`` is materialized (``(d_out, d_in)`` per column) and contracted ("materialize"
mode); each layer takes the cheaper (:func:`~.cost.choose_mode`). All deltas of all such layers come from one
batched backward: a zero "probe" is added to every layer's output (a forward hook inside ``functional_call``), the
batched forward is differentiated w.r.t. the probes with ``vjp``, and the pullback is ``vmap``-ed over the
seeds (samples are independent, so the cotangent whose row n is ``seeds[n, c]`` gives ``delta_nc`` for every
n at once); without ``vmap`` (a model it cannot trace) the same products come from plain autograd
(``rows.batched_vjp``). Gradient seeds are just extra columns.

One concern per module:

- :mod:`.base`: :class:`GhostRule`, the interface of a layer kind's rule (recognise a module, refuse one, the
  shapes of a call, its inputs and outputs per position, its input products, its per-sample weight gradient);
- one module per kind: :mod:`.linear` (``nn.Linear``), :mod:`.conv` (``nn.Conv1d``/``nn.Conv2d``),
  :mod:`.hf_conv1d` (Hugging Face ``Conv1D``, found without importing transformers), :mod:`.embedding`;
- :mod:`.registry`: :data:`RULES`, the one table of rules, and :func:`rule_for`;
- :mod:`.layer`: :class:`GhostLayer`, one module handled by its rule;
- :mod:`.selection`: which layers take their rule (:func:`select_layers`: candidates, structure, per-sample check);
- :mod:`.cost`: the cost model (ghost or materialize, or the generic path);
- :mod:`.contraction`: the Gram contraction shared by every kind;
- :mod:`.contribute`: the factors of a block of columns and their contraction into an accumulator
  (:func:`contribute`).

A new layer kind is one new module with a :class:`GhostRule` subclass and one entry in :data:`RULES`.
"""

from __future__ import annotations

from curvscope.curvature.gram.ghost.base import GhostRule
from curvscope.curvature.gram.ghost.contribute import block_factors, contribute
from curvscope.curvature.gram.ghost.conv import ConvRule
from curvscope.curvature.gram.ghost.cost import GHOST_BMM_PENALTY, MODES, choose_mode
from curvscope.curvature.gram.ghost.embedding import EmbeddingRule
from curvscope.curvature.gram.ghost.hf_conv1d import HFConv1DRule, is_hf_conv1d
from curvscope.curvature.gram.ghost.layer import GhostLayer
from curvscope.curvature.gram.ghost.linear import LinearRule
from curvscope.curvature.gram.ghost.registry import RULES, rule_for
from curvscope.curvature.gram.ghost.selection import candidate_layers, select_layers

__all__ = ["GHOST_BMM_PENALTY", "MODES", "RULES", "ConvRule", "EmbeddingRule", "GhostLayer", "GhostRule",
           "HFConv1DRule", "LinearRule", "block_factors", "candidate_layers", "choose_mode", "contribute",
           "is_hf_conv1d", "rule_for", "select_layers"]
