"""The Gram matrix ``V^T V`` of the GGN's columns, per parameter group, without forming the GGN or all of V.

Rows and columns of the *extended* Gram are indexed by two kinds of backpropagated vectors:

- ``v`` columns: ``v_nc = J_n^T s_nc / sqrt(N_V)`` (``CURVATURE.md`` section 2), ``N_V * K`` of them;
- ``g`` columns: per-sample gradients ``g_n = J_n^T dl_n/df_n``, ``N`` of them (only when directional quantities
  are wanted).

For a parameter group P the engine accumulates ``vv = V_P^T V_P`` ``(N_V*K, N_V*K)``, ``vg = V_P^T G_P``
``(N_V*K, N)`` and ``gg = G_P^T G_P`` ``(N, N)`` as sums of per-parameter-tensor contributions. Each tensor's
rows of V are materialized with ``torch.func`` (``vmap`` over samples and columns of ``vjp``), contracted and
discarded: the generic path, valid for any differentiable model. Layers with a fast rule (``ghost.py``) add
their contributions without materializing rows. Over a ``torch.distributed`` process group each rank contracts
its own columns with every rank's (``distributed.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap

from curvscope.curvature.columns import Columns, gradient_seeds, make_columns
from curvscope.curvature.memory import ColumnBlock, MemoryPlan, column_blocks, pairwise
from curvscope.errors import CurvscopeError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from curvscope.curvature.distributed import Shard


@dataclass
class GroupGram:
    """Accumulated Gram blocks of one parameter group (float64)."""

    name: str
    param_names: tuple[str, ...]
    vv: Tensor
    vg: Tensor | None = None
    gg: Tensor | None = None


class GramAccumulator:
    """The Gram blocks of every group, and which groups own each parameter (contributions are scattered into
    them by the generic path and the ghost rule, see ``_scatter``)."""

    def __init__(self, groups: Sequence[tuple[str, Sequence[str]]], num_v: int, num_g: int | None,
                 device: torch.device):
        self.groups = [GroupGram(name, tuple(names), torch.zeros(num_v, num_v, dtype=torch.float64, device=device),
                                 None if num_g is None else torch.zeros(num_v, num_g, dtype=torch.float64,
                                                                        device=device),
                                 None if num_g is None else torch.zeros(num_g, num_g, dtype=torch.float64,
                                                                        device=device))
                       for name, names in groups]
        self.owners: dict[str, list[GroupGram]] = {}
        for g in self.groups:
            for n in g.param_names:
                self.owners.setdefault(n, []).append(g)

    def wanted(self, name: str) -> bool:
        return name in self.owners


def per_sample_vjp(problem, names: Sequence[str], sample_idx: Tensor, seeds: Tensor) -> dict[str, Tensor]:
    """Rows of V for parameters ``names``: ``J_n^T seeds[n, k]`` for the samples ``sample_idx``.

    Args:
        sample_idx: ``(n,)`` batch indices; seeds: ``(n, K, C)``.
    Returns:
        name -> ``(n, K, *param.shape)``.
    """
    chosen = {k: problem.params[k] for k in names}
    frozen = {**problem.buffers, **{k: v for k, v in problem.params.items() if k not in chosen}}
    model = problem.model

    def one_sample(x: Tensor, seed: Tensor) -> dict[str, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, {**frozen, **p}, (x.unsqueeze(0),))[0]

        _, pullback = vjp(f, chosen)
        return vmap(pullback)(seed)[0]

    return vmap(one_sample)(problem.inputs[sample_idx], seeds)


def _owner_sets(acc: GramAccumulator, names: Sequence[str]) -> list[tuple[list[GroupGram], list[str]]]:
    """``names`` grouped by the groups that own them: contributions within a set are summed before adding."""
    sets: dict[tuple[int, ...], tuple[list[GroupGram], list[str]]] = {}
    for n in names:
        owners = acc.owners.get(n, [])
        sets.setdefault(tuple(id(g) for g in owners), (owners, []))[1].append(n)
    return [s for s in sets.values() if s[0]]


def _scatter(groups: Sequence[GroupGram], num_v: int, rows: Tensor, cols: Tensor, block: Tensor,
             mirror: bool) -> None:
    """Add the block ``[rows, cols]`` of the extended Gram ``[V, G]^T [V, G]`` to ``groups``.

    Args:
        num_v: number of V columns (extended indices below it are V columns, the others ``N_V*K + m``).
        rows: ``(r,)``, cols: ``(c,)`` extended indices; block: ``(r, c)``.
        mirror: also add ``block^T`` at ``[cols, rows]`` (an off-diagonal block pair).
    Entries with a g row and a v column are the mirror images of ``vg`` entries and are skipped.
    Block rows of one rank (``distributed.RowGroupGram``, anything with ``add_rows``) take the block as is:
    there ``rows`` are the rank's own columns and every pair is contracted once, so ``mirror`` is ignored.
    """
    block = block.to(torch.float64)
    if hasattr(groups[0], "add_rows"):
        for g in groups:
            g.add_rows(rows, cols, block)
        return
    for r, c, b in ((rows, cols, block), (cols, rows, block.T)) if mirror else ((rows, cols, block),):
        rv, cv = r < num_v, c < num_v
        parts = [("vv", r[rv], c[cv], b[rv][:, cv])]
        if groups[0].vg is not None:
            parts += [("vg", r[rv], c[~cv] - num_v, b[rv][:, ~cv]),
                      ("gg", r[~rv] - num_v, c[~cv] - num_v, b[~rv][:, ~cv])]
        for attr, ri, ci, sub in parts:
            if sub.numel():
                rs, cs = _as_slice(ri), _as_slice(ci)
                for g in groups:
                    if rs is not None and cs is not None:
                        getattr(g, attr)[rs, cs] += sub
                    else:
                        getattr(g, attr).index_put_((ri.unsqueeze(1), ci.unsqueeze(0)), sub, accumulate=True)


def _as_slice(index: Tensor) -> slice | None:
    """``index`` ``(r,)`` as a slice when it is a run of consecutive integers (the usual case), else None."""
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == index.numel() and bool((index.diff() == 1).all()):
        return slice(first, last + 1)
    return None


def _generic_contributions(problem, names: list[str], columns: Columns, grad_seeds: Tensor | None,
                           acc: GramAccumulator, plan: MemoryPlan, progress: Callable[[int], None],
                           shard: Shard | None = None) -> None:
    """Generic path: materialize rows of V (and G) for chunks of parameters, contract, discard.

    Within a parameter chunk the columns are cut into blocks (``memory.column_blocks``) and contracted block
    pair by block pair, so a batch too large for the budget is split (rows recomputed), never refused.
    With a ``shard`` (``distributed.Shard``) this rank's blocks are contracted with every rank's (``acc``
    holds this rank's block rows); chunks are sized for the columns a rank holds at once.
    """
    num_v = columns.num_columns
    total = num_v + (problem.batch_size if grad_seeds is not None else 0)
    held_rows = total if shard is None else shard.held_columns(columns, grad_seeds is not None)
    for chunk in plan.param_chunks(names, problem.params, rows=held_rows):
        row_bytes = sum(problem.params[n].numel() * problem.params[n].element_size() for n in chunk)
        if shard is None:
            max_columns, held = plan.blocking(total, row_bytes, row_bytes * plan.activation_factor)
        else:
            max_columns, held = shard.blocking(plan, columns, grad_seeds is not None, row_bytes,
                                               row_bytes * plan.activation_factor)
        sets = _owner_sets(acc, chunk)

        def compute(block: ColumnBlock, chunk: list[str] = chunk) -> dict[str, Tensor]:
            rows = per_sample_vjp(problem, chunk, block.samples, block.seeds)
            return {k: v.detach().reshape(block.num_columns, -1) for k, v in rows.items()}

        def contract(bi: ColumnBlock, fi: dict[str, Tensor], bj: ColumnBlock, fj: dict[str, Tensor],
                     sets: list = sets) -> None:
            for groups, members in sets:
                gram = sum(fi[n] @ fj[n].T for n in members)
                _scatter(groups, num_v, bi.index, bj.index, gram, mirror=bi is not bj)

        if shard is None:
            pairwise(column_blocks(columns, grad_seeds, max_columns), compute, contract, held)
        else:
            shard.pairwise(columns, grad_seeds, max_columns, compute, contract, held)
        progress(len(chunk))


def _rows_by_sample_chunks(problem, names: list[str], sample_idx: Tensor, seeds: Tensor, plan: MemoryPlan
                           ) -> dict[str, Tensor]:
    """``per_sample_vjp`` over sample chunks sized by the memory plan, concatenated."""
    n = sample_idx.shape[0]
    step = plan.sample_chunk(problem, names, per_sample_rows=seeds.shape[1], num_samples=n)
    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for i in range(0, n, step):
        out = per_sample_vjp(problem, names, sample_idx[i:i + step], seeds[i:i + step])
        for k in names:
            parts[k].append(out[k].detach())
    return {k: torch.cat(v) for k, v in parts.items()}


def compute_gram(problem, groups: Sequence[tuple[str, Sequence[str]]], columns: Columns | None = None,
                 with_gradients: bool = False, mc_samples: int = 0, subsample: int | None = None, seed: int = 0,
                 ghost: bool = True, plan: MemoryPlan | None = None,
                 progress: Callable[[int], None] | None = None, process_group: ProcessGroup | None = None
                 ) -> tuple[list[GroupGram], Columns, Tensor]:
    """Gram blocks for each group in one pass over the parameters.

    Args:
        groups: ``(name, parameter names)`` pairs; a parameter may belong to several groups (e.g. ``all`` and
            its layer), each receives its contribution.
        with_gradients: also accumulate ``vg`` and ``gg`` (for directional derivatives).
        ghost: use the fast per-layer rules where they are cheaper (``False``: generic path only).
        progress: called with the number of parameter tensors finished.
        process_group: an initialized ``torch.distributed`` group (collective: every rank passes the same full
            problem and arguments). Each rank computes its slice of the columns (``distributed.block_rows``);
            the full Gram blocks are then assembled on every rank (``compute_spectrum`` keeps each group's
            Gram on one rank instead). ``columns`` cannot be given with a process group.
    Returns:
        ``(group_grams, columns, outputs)``: outputs ``(N, C)`` of the model at the problem's parameters.
    """
    if process_group is not None:
        from curvscope.curvature import distributed

        if columns is not None:
            raise CurvscopeError("compute_gram: pass mc_samples/subsample/seed, not columns, with a process_group")
        shard = distributed.Shard.create(process_group, problem)
        rows, columns, outputs = distributed.block_rows(
            problem, groups, shard, with_gradients=with_gradients, mc_samples=mc_samples, subsample=subsample,
            seed=seed, ghost=ghost, plan=plan, progress=progress)
        return distributed.assemble_everywhere(rows, shard, columns), columns, outputs
    plan = plan or MemoryPlan.default(problem.device)
    progress = progress or (lambda _n: None)
    with torch.no_grad():
        outputs = problem.forward()
    if columns is None:
        columns = make_columns(problem, outputs, mc_samples=mc_samples, subsample=subsample, seed=seed)
    grad_seeds = gradient_seeds(problem, outputs) if with_gradients else None
    acc = GramAccumulator(groups, columns.num_columns, problem.batch_size if with_gradients else None,
                          problem.device)
    names = [n for n in problem.params if acc.wanted(n)]
    handled: set[str] = set()
    if ghost:
        from curvscope.curvature import ghost as ghost_rules

        handled = ghost_rules.contribute(problem, names, columns, grad_seeds, acc, plan)
        if handled:
            progress(len(handled))
    rest = [n for n in names if n not in handled]
    if rest:
        _generic_contributions(problem, rest, columns, grad_seeds, acc, plan, progress)
    return acc.groups, columns, outputs


def materialize_columns(problem, param_names: Sequence[str], mc_samples: int = 0, subsample: int | None = None,
                        seed: int = 0) -> dict[str, Tensor]:
    """The rows of ``V`` for ``param_names``: name -> ``(num_columns, *param.shape)``, columns sample-major.

    Materializes them: use it for small parameter sets (the factors engine's ``--source ggn``), not for spectra.
    """
    columns = make_columns(problem, mc_samples=mc_samples, subsample=subsample, seed=seed)
    plan = MemoryPlan.default(problem.device)
    rows = _rows_by_sample_chunks(problem, list(param_names), columns.samples, columns.seeds, plan)
    return {k: v.reshape(columns.num_columns, *problem.params[k].shape) for k, v in rows.items()}


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
    N_V, K = columns.num_samples, columns.per_sample
    coeff = coeff.to(columns.seeds.dtype).reshape(N_V, K, -1)
    if process_group is None:
        out = _apply_v_samples(problem, columns.samples, columns.seeds, coeff, names)
    else:
        from curvscope.curvature import distributed

        shard = distributed.Shard.create(process_group, problem, check=False)
        c0, c1 = shard.curvature_range(columns)
        with shard.stage():
            out = _apply_v_samples(problem, columns.samples[c0:c1], columns.seeds[c0:c1], coeff[c0:c1], names)
        out = shard.all_reduce_sum(out)
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
    chosen = {k: problem.params[k] for k in names}
    frozen = {**problem.buffers, **{k: v for k, v in problem.params.items() if k not in chosen}}
    inputs = problem.inputs[samples]

    def f(p: dict[str, Tensor]) -> Tensor:
        return functional_call(problem.model, {**frozen, **p}, (inputs,))

    _, pullback = vjp(f, chosen)
    return vmap(pullback)(cotangents)[0]
