"""Rows of V, the generic path: by ``torch.func``, valid for any differentiable model (``docs/conventions.md`` §2, §3).

A column of V is ``v_nc = J_n^T s_nc / sqrt(N_V)``: one vector-Jacobian product of sample n's outputs with a
seed (:class:`~curvscope.curvature.gram.columns.Columns`). :func:`per_sample_vjp` materializes the rows of V of some
parameters (``vmap`` over samples and seeds of ``vjp``); :func:`contribute` contracts them block pair by block
pair into the Gram rows of a layout and discards them; :func:`apply_v` multiplies V by coefficient vectors
without materializing anything (one batched VJP).

Models ``vmap`` cannot trace (data-dependent control flow, ``.item()``, RNN kernels, a forward that depends on the
batch size...): :func:`vmap_usable` probes the vmapped per-sample path once per problem on two samples, against
plain autograd; when it fails (or disagrees) the problem records why (``problem.vmap_error``,
``problem.path``) and every path here runs without ``vmap``: one forward of the batch, and one backward per
column (``torch.autograd.grad`` with ``is_grads_batched`` where it works, else a loop), with the cotangent of
column (n, c) nonzero only in sample n's row. The numbers are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.utils import _pytree

from curvscope.curvature.gram.columns import Columns
from curvscope.curvature.gram.layout import GramAccumulator, Layout, make_layout
from curvscope.curvature.memory import ColumnBlock, MemoryPlan
from curvscope.errors import CurvscopeError
from curvscope.problem import one_line

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _split(problem, names: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(chosen, frozen)``: the parameters ``names``, and everything else ``functional_call`` needs."""
    chosen = {k: problem.params[k] for k in names}
    return chosen, {**problem.buffers, **{k: v for k, v in problem.params.items() if k not in chosen}}


# -- vmap or plain autograd ------------------------------------------------------------------------------------

COTANGENT_CHUNK = 64
"""Columns backpropagated at once by the plain-autograd path (``is_grads_batched``)."""
FEW_COTANGENTS = 16
"""Up to this many cotangents, plain autograd runs one backward pass each rather than one batched backward: as
fast on small models, and it starts faster (torch's batched backward, like any ``grad_outputs`` tensor, first
imports torch.fx's symbolic-shape machinery and sympy: 0.2-0.3 s, a tenth of a quick run)."""


def is_fatal(exc: BaseException) -> bool:
    """Errors that falling back cannot help (ours, out of memory, interrupts)."""
    return isinstance(exc, CurvscopeError | torch.OutOfMemoryError | KeyboardInterrupt)


def not_differentiable(exc: BaseException) -> CurvscopeError:
    """The :class:`CurvscopeError` that reports ``exc``, raised when autograd cannot differentiate the model."""
    return CurvscopeError(f"the model cannot be differentiated with respect to its parameters: {one_line(exc)}")


def vmap_usable(problem) -> bool:
    """Whether the vmapped paths may run on ``problem``. The first call probes the per-sample path on (up to)
    two samples against plain autograd; a failure or a disagreement is recorded on the problem."""
    if not problem.use_vmap or problem.vmap_error is not None:
        return False
    if not problem.vmap_checked:
        problem.vmap_checked = True
        _probe(problem)
    return problem.vmap_error is None


def _probe(problem) -> None:
    n = min(2, problem.batch_size)
    idx = torch.arange(n, device=problem.device)
    g = torch.Generator().manual_seed(0)
    seeds = torch.randn(n, 1, problem.num_outputs, generator=g, dtype=torch.float64).to(problem.device,
                                                                                          problem.dtype)
    names = list(problem.params)
    try:
        fast = _vmap_rows(problem, names, idx, seeds)
    except Exception as exc:
        if is_fatal(exc):
            raise
        problem.note_vmap_failure(exc)
        return
    slow = _autograd_rows(problem, names, idx, seeds)
    err = sum(float(((fast[k] - slow[k]).to(torch.float64) ** 2).sum()) for k in names) ** 0.5
    ref = sum(float((slow[k].to(torch.float64) ** 2).sum()) for k in names) ** 0.5
    if err > 10 * problem.eps ** 0.5 * ref + torch.finfo(problem.dtype).tiny:
        problem.note_vmap_failure("its per-sample gradients disagree with plain autograd's (an op vmap gets "
                                  "wrong, or a forward that depends on the batch)")


def map_stacked(problem, fn: Callable, xs):
    """``vmap(fn)(xs)`` on the fast path, else ``fn`` on each slice of ``xs`` (a tensor or a tree of tensors with
    a common leading dim), results stacked. A ``vmap`` failure is recorded on the problem."""
    if vmap_usable(problem):
        try:
            return vmap(fn)(xs)
        except Exception as exc:
            if is_fatal(exc):
                raise
            problem.note_vmap_failure(exc)
    leaves, spec = _pytree.tree_flatten(xs)
    results = [fn(_pytree.tree_unflatten([leaf[i] for leaf in leaves], spec)) for i in range(leaves[0].shape[0])]
    flat = [_pytree.tree_flatten(r) for r in results]
    return _pytree.tree_unflatten([torch.stack(parts) for parts in zip(*(f[0] for f in flat), strict=True)],
                                  flat[0][1])


def batched_grad(outputs: Tensor, inputs: Sequence[Tensor], cotangents: Callable[[int, int], Tensor] | Tensor,
                 count: int | None = None) -> list[Tensor]:
    """``(m, *input.shape)`` for each input: the vector-Jacobian products of ``outputs`` with m cotangents, by
    plain autograd (``is_grads_batched`` in chunks where it works, else one backward each).

    Args:
        outputs: the tensor to differentiate, with a graph back to ``inputs``.
        inputs: the tensors to differentiate with respect to (an input ``outputs`` does not depend on gets
            zeros).
        cotangents: ``(m, *outputs.shape)``, or a function ``(start, stop) -> (stop - start, *outputs.shape)``
            building them a chunk at a time (then ``count`` = m).
        count: m, when ``cotangents`` is a function (ignored for a tensor).
    """
    m = cotangents.shape[0] if isinstance(cotangents, Tensor) else int(count)
    chunk_of = (lambda a, b: cotangents[a:b]) if isinstance(cotangents, Tensor) else cotangents
    parts: list[list[Tensor]] = [[] for _ in inputs]
    batched = m > FEW_COTANGENTS
    for a in range(0, m, COTANGENT_CHUNK):
        cot = chunk_of(a, min(a + COTANGENT_CHUNK, m))
        grads = None
        if batched:
            try:
                grads = torch.autograd.grad(outputs, list(inputs), cot, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            except Exception as exc:
                if is_fatal(exc):
                    raise
                batched = False
        if grads is None:  # a scalar objective each: ``grad((outputs * c).sum())`` is ``grad(outputs, c)``
            rows = [torch.autograd.grad((outputs * c).sum(), list(inputs), retain_graph=True, allow_unused=True)
                    for c in cot]
            grads = [None if r[0] is None else torch.stack(r) for r in zip(*rows, strict=True)]
        for i, (x, gr) in enumerate(zip(inputs, grads, strict=True)):
            parts[i].append(torch.zeros(cot.shape[0], *x.shape, dtype=x.dtype, device=x.device) if gr is None
                            else gr.detach())
    if m == 0:
        return [torch.zeros(0, *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
    return [torch.cat(p) for p in parts]


def batched_vjp(problem, fn: Callable[[dict[str, Tensor]], tuple[Tensor, Any]], primals: dict[str, Tensor],
                cotangents: Tensor, few: bool = False) -> tuple[dict[str, Tensor], Any]:
    """The vector-Jacobian products of ``fn(primals) = (outputs, aux)`` with ``m`` cotangents
    ``(m, *outputs.shape)``: name -> ``(m, *primal.shape)``, and ``aux`` (detached). ``vmap`` over ``vjp``'s
    pullback on the fast path, plain autograd otherwise; ``few``: plain autograd's batched backward right away
    (it starts faster than ``torch.func`` and needs no vmap probe: a handful of cotangents, or the ghost rules'
    backward of the seeds to layer outputs)."""
    if not few and vmap_usable(problem):
        try:
            _out, pullback, aux = vjp(fn, primals, has_aux=True)
            return vmap(pullback)(cotangents)[0], aux
        except Exception as exc:
            if is_fatal(exc):
                raise
            problem.note_vmap_failure(exc)
    try:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in primals.items()}
            out, aux = fn(leaves)
            grads = batched_grad(out, list(leaves.values()), cotangents.to(out.dtype))
    except Exception as exc:
        if is_fatal(exc):
            raise
        raise not_differentiable(exc) from exc
    aux = _pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, aux)
    return dict(zip(leaves, grads, strict=True)), aux


def batch_with_partner(problem, sample_idx: Tensor) -> Tensor:
    """``sample_idx``, plus one other sample when it holds a single one (a forward that squeezes its batch dim
    breaks on one sample); the extra rows are ignored."""
    if sample_idx.numel() == 1 and problem.batch_size > 1:
        other = 1 if int(sample_idx[0]) == 0 else 0
        return torch.cat([sample_idx, sample_idx.new_tensor([other])])
    return sample_idx


def per_sample_vjp(problem, names: Sequence[str], sample_idx: Tensor, seeds: Tensor) -> dict[str, Tensor]:
    """Rows of V for parameters ``names``: ``J_n^T seeds[n, k]`` for the samples ``sample_idx``.

    ``vmap`` over samples and seeds of ``vjp`` where the model allows it, else plain autograd (module docstring).

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        names: the parameters to differentiate (the others are held fixed).
        sample_idx: ``(n,)`` batch indices.
        seeds: ``(n, K, C)`` output cotangents, ``K`` per sample.

    Returns:
        name -> ``(n, K, *param.shape)``.
    """
    if vmap_usable(problem):
        try:
            return _vmap_rows(problem, names, sample_idx, seeds)
        except Exception as exc:
            if is_fatal(exc):
                raise
            problem.note_vmap_failure(exc)
    return _autograd_rows(problem, names, sample_idx, seeds)


def _vmap_rows(problem, names: Sequence[str], sample_idx: Tensor, seeds: Tensor) -> dict[str, Tensor]:
    chosen, frozen = _split(problem, names)

    def one_sample(x: Tensor, seed: Tensor) -> dict[str, Tensor]:
        def f(p: dict[str, Tensor]) -> Tensor:
            return problem.call({**frozen, **p}, x.unsqueeze(0))[0]

        _, pullback = vjp(f, chosen)
        return vmap(pullback)(seed)[0]

    return vmap(one_sample)(problem.inputs[sample_idx], seeds)


def _autograd_rows(problem, names: Sequence[str], sample_idx: Tensor, seeds: Tensor) -> dict[str, Tensor]:
    """:func:`per_sample_vjp` without ``vmap``: one forward of the samples, one backward per column."""
    names = list(names)
    n, K = seeds.shape[:2]
    idx = batch_with_partner(problem, sample_idx)
    try:
        with torch.enable_grad():
            leaves = {k: problem.params[k].detach().requires_grad_(True) for k in names}
            _chosen, frozen = _split(problem, names)
            out = problem.call({**frozen, **leaves}, problem.inputs[idx])

            def cotangents(a: int, b: int) -> Tensor:
                cot = torch.zeros(b - a, *out.shape, dtype=out.dtype, device=out.device)
                j = torch.arange(a, b, device=out.device)
                cot[torch.arange(b - a, device=out.device), j // K] = seeds[j // K, j % K].to(out.dtype)
                return cot

            grads = batched_grad(out, [leaves[k] for k in names], cotangents, count=n * K)
    except Exception as exc:
        if is_fatal(exc):
            raise
        raise not_differentiable(exc) from exc
    return {k: g.reshape(n, K, *problem.params[k].shape) for k, g in zip(names, grads, strict=True)}


def per_sample_gradients(problem, names: Sequence[str], sample_idx: Tensor) -> dict[str, Tensor]:
    """``g_n = d l_n / d theta`` for the samples ``sample_idx`` ``(n,)``: name -> ``(n, *param.shape)``.

    The rows of ``J_n^T dl_n/df_n`` (:func:`per_sample_vjp` with the output gradients as seeds): the loss's
    per-sample convention, token scale included, whatever the path.
    """
    with torch.no_grad():
        out = problem.forward(inputs=problem.inputs[batch_with_partner(problem, sample_idx)])[:sample_idx.numel()]
    seeds = problem.loss.output_gradient(out, problem.targets[sample_idx]).unsqueeze(1)
    return {k: v[:, 0] for k, v in per_sample_vjp(problem, names, sample_idx, seeds).items()}


def rows_by_sample_chunks(problem, names: list[str], sample_idx: Tensor, seeds: Tensor | Columns, plan: MemoryPlan
                          ) -> dict[str, Tensor]:
    """:func:`per_sample_vjp` over sample chunks sized by the memory plan, concatenated; ``seeds`` ``(n, K, C)``
    or the :class:`~curvscope.curvature.gram.columns.Columns` of ``sample_idx`` (their seeds built a chunk at a
    time)."""
    n = sample_idx.shape[0]
    per_sample = seeds.per_sample if isinstance(seeds, Columns) else seeds.shape[1]
    step = plan.sample_chunk(problem, names, per_sample_rows=per_sample, num_samples=n)
    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for i in range(0, n, step):
        chunk = seeds.seed_chunk(i, min(i + step, n)) if isinstance(seeds, Columns) else seeds[i:i + step]
        out = per_sample_vjp(problem, names, sample_idx[i:i + step], chunk)
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
        problem: the :class:`~curvscope.problem.Problem`.
        names: the parameters whose rows are materialized here.
        columns: the columns of V.
        grad_seeds: ``(N, 1, C)`` seeds of the per-sample gradients (the rows of G), or ``None``.
        acc: the accumulator the contracted blocks are added to (each parameter to the groups it belongs to).
        plan: the memory plan that sizes the parameter chunks and column blocks.
        layout: which column blocks this process computes and contracts (single process or sharded).
        advance: called with the number of parameter tensors finished (progress), or ``None``.
    """
    num_g = None if grad_seeds is None else grad_seeds.shape[0]
    held_rows = layout.held_columns(columns, num_g)
    for chunk in plan.param_chunks(names, problem.params, rows=held_rows):
        row_bytes = sum(problem.params[n].numel() * problem.params[n].element_size() for n in chunk)
        max_columns, held = plan.blocking(held_rows, row_bytes, row_bytes * plan.activation_factor
                                          + columns.column_bytes)  # a block builds its seeds
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
    coeff = coeff.to(columns.dtype).reshape(columns.num_samples, columns.per_sample, -1)
    layout = make_layout(problem, process_group, check=False)
    c0, c1 = layout.curvature_range(columns)
    with layout.stage():
        out = _apply_v_samples(problem, columns.samples[c0:c1], lambda: columns.combine(c0, c1, coeff[c0:c1]),
                               coeff.shape[-1], names)
    out = layout.all_reduce_sum(out)
    full = {k: out[k] if k in out else torch.zeros(coeff.shape[-1], *v.shape, dtype=v.dtype, device=v.device)
            for k, v in problem.params.items()}
    return {k: v[0] for k, v in full.items()} if single else full


def _apply_v_samples(problem, samples: Tensor, combined: Callable[[], Tensor], count: int, names: list[str]
                     ) -> dict[str, Tensor]:
    """``sum_n J_n^T (sum_k seeds[n, k] coeff[n, k, j])`` over ``samples`` ``(n,)``: name -> ``(count, *shape)``
    (zeros for no samples); ``combined()`` gives the cotangents ``sum_k seeds[n, k] coeff[n, k, j]``
    ``(count, n, C)`` (:meth:`~curvscope.curvature.gram.columns.Columns.combine`)."""
    if samples.numel() == 0:
        return {n: torch.zeros(count, *problem.params[n].shape, dtype=problem.params[n].dtype,
                               device=problem.params[n].device) for n in names}
    cotangents = combined()  # (count, n, C)
    chosen, frozen = _split(problem, names)
    idx = batch_with_partner(problem, samples)
    if idx.numel() > samples.numel():
        cotangents = torch.cat([cotangents, torch.zeros_like(cotangents[:, :1])], dim=1)
    inputs = problem.inputs[idx]
    grads, _ = batched_vjp(problem, lambda p: (problem.call({**frozen, **p}, inputs), None), chosen, cotangents)
    return grads
