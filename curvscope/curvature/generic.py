"""The generic path: rows of V by ``torch.func``, valid for any differentiable model (``docs/conventions.md`` §2, §3).

A column of V is ``v_nc = J_n^T s_nc / sqrt(N_V)``: one vector-Jacobian product of sample n's outputs with a
seed (:class:`~curvscope.curvature.columns.Columns`). :func:`per_sample_vjp` materializes the rows of V of some
parameters (``vmap`` over samples and seeds of ``vjp``); :func:`contribute` contracts them block pair by block
pair into the Gram rows of a layout and discards them; :func:`apply_v` multiplies V by coefficient vectors
without materializing anything (one batched VJP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap

from curvscope.curvature.columns import Columns
from curvscope.curvature.layout import GramAccumulator, Layout, make_layout
from curvscope.curvature.memory import ColumnBlock, MemoryPlan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _split(problem, names: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(chosen, frozen)``: the parameters ``names``, and everything else ``functional_call`` needs."""
    chosen = {k: problem.params[k] for k in names}
    return chosen, {**problem.buffers, **{k: v for k, v in problem.params.items() if k not in chosen}}


def per_sample_vjp(problem, names: Sequence[str], sample_idx: Tensor, seeds: Tensor) -> dict[str, Tensor]:
    """Rows of V for parameters ``names``: ``J_n^T seeds[n, k]`` for the samples ``sample_idx``.

    Args:
        sample_idx: ``(n,)`` batch indices; seeds: ``(n, K, C)``.
    Returns:
        name -> ``(n, K, *param.shape)``.
    """
    chosen, frozen = _split(problem, names)
    model = problem.model

    def one_sample(x: Tensor, seed: Tensor) -> dict[str, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, {**frozen, **p}, (x.unsqueeze(0),))[0]

        _, pullback = vjp(f, chosen)
        return vmap(pullback)(seed)[0]

    return vmap(one_sample)(problem.inputs[sample_idx], seeds)


def rows_by_sample_chunks(problem, names: list[str], sample_idx: Tensor, seeds: Tensor, plan: MemoryPlan
                          ) -> dict[str, Tensor]:
    """:func:`per_sample_vjp` over sample chunks sized by the memory plan, concatenated."""
    n = sample_idx.shape[0]
    step = plan.sample_chunk(problem, names, per_sample_rows=seeds.shape[1], num_samples=n)
    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for i in range(0, n, step):
        out = per_sample_vjp(problem, names, sample_idx[i:i + step], seeds[i:i + step])
        for k in names:
            parts[k].append(out[k].detach())
    return {k: torch.cat(v) for k, v in parts.items()}


def contribute(problem, names: list[str], columns: Columns, grad_seeds: Tensor | None, acc: GramAccumulator,
               plan: MemoryPlan, layout: Layout, advance: Callable[[int], None] | None = None) -> None:
    """Add the contributions of the parameters ``names`` to ``acc``: materialize rows of V (and G) for chunks of
    parameters, contract, discard.

    Within a parameter chunk the columns are cut into blocks (``memory.column_blocks``) and contracted block
    pair by block pair (``layout.pairwise``), so a batch too large for the budget is split (rows recomputed),
    never refused. Chunks are sized for the columns the layout holds at once.

    Args:
        grad_seeds: ``(N, 1, C)`` or ``None``; advance: called with the number of parameter tensors finished.
    """
    num_g = None if grad_seeds is None else grad_seeds.shape[0]
    held_rows = layout.held_columns(columns, num_g)
    for chunk in plan.param_chunks(names, problem.params, rows=held_rows):
        row_bytes = sum(problem.params[n].numel() * problem.params[n].element_size() for n in chunk)
        max_columns, held = plan.blocking(held_rows, row_bytes, row_bytes * plan.activation_factor)
        sets = acc.owner_sets(chunk)

        def compute(block: ColumnBlock, chunk: list[str] = chunk) -> dict[str, Tensor]:
            rows = per_sample_vjp(problem, chunk, block.samples, block.seeds)
            return {k: v.detach().reshape(block.num_columns, -1) for k, v in rows.items()}

        def contract(bi: ColumnBlock, fi: dict[str, Tensor], bj: ColumnBlock, fj: dict[str, Tensor],
                     sets: list = sets) -> None:
            for groups, members in sets:
                acc.add(groups, bi, bj, sum(fi[n] @ fj[n].T for n in members))

        layout.pairwise(columns, grad_seeds, max_columns, compute, contract, held)
        if advance is not None:
            advance(len(chunk))


def apply_v(problem, columns: Columns, coefficients: Tensor, names: Sequence[str] | None = None,
            process_group: ProcessGroup | None = None) -> dict[str, Tensor]:
    """``V c`` as parameter-shaped tensors, for coefficient vectors ``c``: ``(num_columns,)`` or ``(num_columns, k)``
    (then a leading dim ``k`` is added). One batched VJP: ``V c = sum_n J_n^T (sum_k seeds[n, k] c[n, k])``.

    Parameters outside ``names`` (default: all) are not differentiated and come back as zeros.
    With a ``process_group`` (collective; every rank passes the same problem, columns and coefficients) each
    rank backpropagates its slice of the curvature samples and the sums are all-reduced.
    """
    names = list(problem.params) if names is None else list(names)
    single = coefficients.dim() == 1
    coeff = coefficients.unsqueeze(-1) if single else coefficients  # (NK, k)
    coeff = coeff.to(columns.seeds.dtype).reshape(columns.num_samples, columns.per_sample, -1)
    layout = make_layout(problem, process_group, check=False)
    c0, c1 = layout.curvature_range(columns)
    with layout.stage():
        out = _apply_v_samples(problem, columns.samples[c0:c1], columns.seeds[c0:c1], coeff[c0:c1], names)
    out = layout.all_reduce_sum(out)
    full = {k: out[k] if k in out else torch.zeros(coeff.shape[-1], *v.shape, dtype=v.dtype, device=v.device)
            for k, v in problem.params.items()}
    return {k: v[0] for k, v in full.items()} if single else full


def _apply_v_samples(problem, samples: Tensor, seeds: Tensor, coeff: Tensor, names: list[str]
                     ) -> dict[str, Tensor]:
    """``sum_n J_n^T (sum_k seeds[n, k] coeff[n, k, j])`` over ``samples`` ``(n,)``: name -> ``(k, *shape)``
    (zeros for no samples); seeds ``(n, K, C)``, coeff ``(n, K, k)``."""
    if samples.numel() == 0:
        return {n: torch.zeros(coeff.shape[-1], *problem.params[n].shape, dtype=problem.params[n].dtype,
                               device=problem.params[n].device) for n in names}
    cotangents = torch.einsum("nkc,nkj->jnc", seeds, coeff)  # (k, n, C)
    chosen, frozen = _split(problem, names)
    inputs = problem.inputs[samples]

    def f(p: dict[str, Tensor]) -> Tensor:
        return functional_call(problem.model, {**frozen, **p}, (inputs,))

    _, pullback = vjp(f, chosen)
    return vmap(pullback)(cotangents)[0]
