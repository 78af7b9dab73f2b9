"""The Gram contraction shared by every rule: from two blocks' factors of one layer to its Gram blocks.

For columns ``(n, c)`` and ``(m, d)`` a layer ``y = W a + b`` at T positions contributes (``docs/conventions.md`` §3)

    weight:  sum_{t,s} (a_nt . a_ms)(delta_nct . delta_mds)     (ghost mode), or  v_nc . v_md  (materialize)
    bias:    (sum_t delta_nct) . (sum_s delta_mds)

The input products ``a_nt . a_ms`` are the rule's (:meth:`~.base.GhostRule.input_gram`: dot products, or
comparisons of an embedding's token ids); everything else is the same for every kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from curvscope.curvature.gram.ghost.layer import GhostLayer
from curvscope.curvature.memory import MemoryPlan

InputGram = Callable[[Tensor, Tensor, Tensor | None, Tensor | None, torch.dtype], Tensor]
"""``input_gram(a_i, a_j, valid_i, valid_j, dtype) -> a_i a_j^T``: a rule's input products."""


def weight_gram_t1(ai: Tensor, aj: Tensor, delta_gram: Tensor, input_gram: InputGram, vi: Tensor | None = None,
                   vj: Tensor | None = None) -> Tensor:
    """One position per sample: ``(a_n . a_m)(delta_nc . delta_md)`` from the inputs ``(b_i, d_in)``,
    ``(b_j, d_in)`` (or token ids ``(b_i,)``, ``(b_j,)`` with their gradient masks) and the delta Gram
    ``(b_i*k_i, b_j*k_j)`` (which is also the bias's Gram)."""
    bi, bj = ai.shape[0], aj.shape[0]
    A = input_gram(ai, aj, vi, vj, delta_gram.dtype)  # (bi, bj)
    ki, kj = delta_gram.shape[0] // bi, delta_gram.shape[1] // bj
    return (delta_gram.reshape(bi, ki, bj, kj) * A[:, None, :, None]).reshape(bi * ki, bj * kj)


def weight_gram(fi: dict[str, Tensor], fj: dict[str, Tensor], plan: MemoryPlan, input_gram: InputGram) -> Tensor:
    """``sum_{t,s} (a_nt . a_ms)(delta_nct . delta_mds)`` ``(b_i*k_i, b_j*k_j)`` from the ghost factors.

    In matrix products, per sub-block of p x q samples: the input Gram ``A = a_i a_j^T`` ``(p*T, q*T)`` (one
    matmul), ``R[m] = A[:, m] delta_j[m]`` ``(p*T, k_j*d_out)`` (one bmm over the q samples), then
    ``out[n] = delta_i[n] R[n]^T`` ``(k_i, q*k_j)`` (one bmm over the p samples)."""
    ai, di, aj, dj = fi["a"], fi["delta"], fj["a"], fj["delta"]
    vi, vj = fi.get("valid"), fj.get("valid")  # an embedding's token masks (its "a" are token ids (b, T))
    (bi, ki, T, do), (bj, kj) = di.shape, dj.shape[:2]
    if T == 1:
        return weight_gram_t1(ai[:, 0], aj[:, 0], di.reshape(bi * ki, do) @ dj.reshape(bj * kj, do).T, input_gram,
                              None if vi is None else vi[:, 0], None if vj is None else vj[:, 0])
    out = torch.empty(bi, ki, bj, kj, dtype=di.dtype, device=di.device)
    s = plan.pair_samples(T * (T + kj * do) * di.element_size())
    for p0 in range(0, bi, s):
        for q0 in range(0, bj, s):
            a_p, a_q, d_p, d_q = ai[p0:p0 + s], aj[q0:q0 + s], di[p0:p0 + s], dj[q0:q0 + s]
            P, Q = a_p.shape[0], a_q.shape[0]
            v_p = None if vi is None else vi[p0:p0 + s]
            v_q = None if vj is None else vj[q0:q0 + s]
            A = input_gram(a_p.reshape(P * T, -1), a_q.reshape(Q * T, -1), v_p, v_q, di.dtype)  # (P*T, Q*T)
            A = A.reshape(P, T, Q, T).permute(2, 0, 1, 3).reshape(Q, P * T, T)
            right = torch.bmm(A, d_q.permute(0, 2, 1, 3).reshape(Q, T, kj * do))  # (Q, P*T, kj*d_out)
            right = right.reshape(Q, P, T, kj, do).permute(1, 0, 3, 2, 4).reshape(P, Q * kj, T * do)
            left = d_p.reshape(P, ki, T * do)
            out[p0:p0 + P, :, q0:q0 + Q] = torch.bmm(left, right.transpose(1, 2)).reshape(P, ki, Q, kj)
    return out.reshape(bi * ki, bj * kj)


def layer_grams(layer: GhostLayer, fi: dict[str, Tensor], fj: dict[str, Tensor], plan: MemoryPlan
                ) -> Iterator[tuple[str, Tensor]]:
    """``(parameter name, Gram block)`` of each of ``layer``'s parameters, from two column blocks' factors
    (:func:`~.contribute.block_factors`)."""
    # with one position per sample the bias Gram delta.delta is a factor of the weight's ghost product
    shared = (layer.bias and layer.weight and layer.mode == "ghost" and fi["delta"].shape[2] == 1)
    bias_gram = fi["bias"] @ fj["bias"].T if layer.bias else None
    for name in layer.names:
        if name == layer.bias:
            gram = bias_gram.clone() if shared else bias_gram
        elif layer.mode == "materialize":
            gram = fi["weight"] @ fj["weight"].T
        elif shared:
            gram = weight_gram_t1(fi["a"][:, 0], fj["a"][:, 0], bias_gram, layer.rule.input_gram)
        else:
            gram = weight_gram(fi, fj, plan, layer.rule.input_gram)
        yield name, gram
