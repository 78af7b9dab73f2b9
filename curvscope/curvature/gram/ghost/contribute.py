"""The fast rules' contributions to the Gram: the factors of a block of columns from one batched backward
(:func:`block_factors`), contracted block pair by block pair into an accumulator (:func:`contribute`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvscope.curvature.gram.columns import Columns
from curvscope.curvature.gram.ghost.contraction import layer_grams
from curvscope.curvature.gram.ghost.cost import MODES, factor_bytes
from curvscope.curvature.gram.ghost.layer import GhostLayer
from curvscope.curvature.gram.ghost.selection import PROBE, forward_probed, select_layers
from curvscope.curvature.gram.layout import GramAccumulator, Layout
from curvscope.curvature.gram.rows import batch_with_partner, batched_vjp, is_fatal
from curvscope.curvature.memory import ColumnBlock, MemoryPlan


def block_factors(problem, layers: Sequence[GhostLayer], block: ColumnBlock) -> dict[str, dict[str, Tensor]]:
    """Per layer, what the contraction needs for the columns of ``block`` (b samples, k seeds each):
    ``bias`` ``(b*k, d_out)``; ``weight`` ``(b*k, d_out*d_in)`` (materialize) or the rule's
    :meth:`~.base.GhostRule.ghost_inputs` (``a`` ``(b, T, d_in)``, or an embedding's token ids and mask) and
    ``delta`` ``(b, k, T, d_out)`` (ghost)."""
    seeds = block.seeds  # built for this block when the columns keep their seeds per token
    b, k = seeds.shape[:2]
    idx = batch_with_partner(problem, block.samples)  # the partner's rows are dropped
    inputs = problem.inputs[idx]
    seeds = seeds.transpose(0, 1)  # (k, b, C)
    if idx.numel() > b:
        seeds = torch.cat([seeds, torch.zeros_like(seeds[:, :1])], dim=1)
    probes = {PROBE + layer.module_name: torch.zeros(idx.numel(), *layer.out_shape, dtype=problem.dtype,
                                                     device=problem.device) for layer in layers}
    deltas, captured = batched_vjp(problem, lambda q: forward_probed(problem, layers, inputs, q), probes, seeds,
                                   few=True)  # autograd's batched backward: no torch.func start-up
    factors = {}
    for layer in layers:
        d = deltas.pop(PROBE + layer.module_name)[:, :b]  # (k, b, *out_shape)
        d = layer.rule.outputs(layer.module, d, 2).transpose(0, 1)  # (b, k, T, d_out)
        f: dict[str, Tensor] = {}
        if layer.bias:
            f["bias"] = d.sum(2).reshape(b * k, -1)
        if layer.weight:
            x = captured[layer.module_name][:b].detach()
            if layer.mode == "materialize":
                a = layer.rule.inputs(layer.module, x, d.dtype)  # (b, T, d_in)
                f["weight"] = torch.einsum("bkto,bti->bkoi", d, a).reshape(b * k, -1)
            else:
                f.update(layer.rule.ghost_inputs(layer.module, x))
                f["delta"] = d
        factors[layer.module_name] = f
    return factors


def contribute(problem, names: Sequence[str], columns: Columns, grad_seeds: Tensor | None,
               acc: GramAccumulator, plan: MemoryPlan, layout: Layout, force_mode: str | None = None) -> set[str]:
    """Add the contributions of the parameters with a fast rule to ``acc``; return the names handled.

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        names: parameters wanted (the others are never touched).
        columns: the columns of V.
        grad_seeds: ``(N, 1, C)`` seeds of the per-sample gradients (the rows of G), or ``None``.
        acc: the accumulator the contracted blocks are added to; parameters it does not want are skipped.
        plan: the memory plan that sizes the column blocks and sample pairs.
        layout: where the columns are (collective for a sharded layout: factors of this rank's columns are
            contracted with every rank's, into ``acc``'s block rows). Layers and modes are chosen from the whole
            batch either way.
        force_mode: ``ghost`` or ``materialize`` for every layer (tests); default: per layer by cost.
    """
    if force_mode is not None and force_mode not in MODES:
        raise ValueError(f"force_mode must be one of {MODES}, got {force_mode!r}")
    names = [n for n in names if acc.wanted(n)]
    with layout.stage():
        try:
            layers = select_layers(problem, names, columns, grad_seeds, plan, force_mode)
        except Exception as exc:  # a model the rules cannot follow: the generic path handles (or refuses) it
            if is_fatal(exc):
                raise
            layers = []
    if not layers:
        return set()
    acc.rules.update({layer.module_name: layer.mode for layer in layers})
    num_g = None if grad_seeds is None else problem.batch_size
    num_samples = columns.num_samples if num_g is None else num_g
    k = (columns.num_columns + (num_g or 0)) / num_samples
    elt = torch.finfo(problem.dtype).bits // 8
    kept, work = factor_bytes(layers, k, plan.activation_factor)  # numbers per column
    max_columns, held = plan.blocking(layout.held_columns(columns, num_g), kept * elt,
                                      work * elt + columns.column_bytes)  # a block builds its seeds
    sets = acc.owner_sets([n for layer in layers for n in layer.names])
    set_of = {n: i for i, (_groups, members) in enumerate(sets) for n in members}

    def contract(bi: ColumnBlock, fi: dict, bj: ColumnBlock, fj: dict) -> None:
        # per set of owning groups, a running sum that is added to the groups once its last member is in
        partial: dict[int, Tensor] = {}
        missing = [len(members) for _groups, members in sets]
        for layer in layers:
            for name, gram in layer_grams(layer, fi[layer.module_name], fj[layer.module_name], plan):
                i = set_of[name]
                partial[i] = partial[i].add_(gram) if i in partial else gram
                missing[i] -= 1
                if not missing[i]:
                    acc.add(sets[i][0], bi, bj, partial.pop(i))

    def compute(blk: ColumnBlock) -> dict[str, dict[str, Tensor]]:
        return block_factors(problem, layers, blk)

    layout.pairwise(columns, grad_seeds, max_columns, compute, contract, held)
    return {n for layer in layers for n in layer.names}
