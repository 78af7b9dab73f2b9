"""The Gram matrix ``V^T V`` of the GGN's columns, per parameter group, without forming the GGN or all of V.

Rows and columns of the *extended* Gram are indexed by two kinds of backpropagated vectors:

- ``v`` columns: ``v_nc = J_n^T s_nc / sqrt(N_V)`` (``docs/conventions.md`` §2), ``N_V * K`` of them;
- ``g`` columns: per-sample gradients ``g_n = J_n^T dl_n/df_n``, ``N`` of them (only when directional quantities
  are wanted, §4).

For a parameter group P the engine accumulates ``vv = V_P^T V_P`` ``(N_V*K, N_V*K)``, ``vg = V_P^T G_P``
``(N_V*K, N)`` and ``gg = G_P^T G_P`` ``(N, N)`` as sums of per-parameter-tensor contributions
(:func:`gram_rows`): layers with a fast rule add theirs without materializing rows (:mod:`.ghost`), every other
parameter goes through the generic path (:mod:`.rows`: rows of V by ``torch.func``, contracted and discarded).
Both contract blocks of columns as the :class:`~curvscope.curvature.gram.layout.Layout` says: all columns in this
process, or each rank of a ``torch.distributed`` group its own columns against every rank's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from curvscope.curvature.gram import ghost as ghost_rules
from curvscope.curvature.gram import rows
from curvscope.curvature.gram.columns import Columns, ColumnSpec, gradient_seeds, make_columns
from curvscope.curvature.gram.layout import GramAccumulator, GroupGram, Layout, make_layout
from curvscope.curvature.memory import MemoryPlan
from curvscope.errors import CurvscopeError
from curvscope.progress import Progress, counter

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def gram_rows(problem, groups: Sequence[tuple[str, Sequence[str]]], layout: Layout, columns: Columns | None = None,
              with_gradients: bool = False, spec: ColumnSpec | None = None, ghost: bool = True,
              plan: MemoryPlan | None = None, progress: Progress | None = None
              ) -> tuple[GramAccumulator, Columns, Tensor]:
    """The Gram rows of every group that ``layout`` holds here, in one pass over the parameters (collective for a
    sharded layout). Arguments as :func:`compute_gram`; ``spec``: which columns to build when ``columns`` is not
    given (default :class:`~curvscope.curvature.gram.columns.ColumnSpec`: exact, every sample).

    Returns:
        ``(acc, columns, outputs)``: ``columns`` of all N_V samples and ``outputs`` ``(N, C)`` of the whole batch,
        the same on every process.
    """
    plan = layout.common_plan(plan or MemoryPlan.default(problem.device))
    outputs = layout.outputs(problem)
    num_g = problem.batch_size if with_gradients else None
    with layout.stage():
        if columns is None:
            columns = make_columns(problem, outputs, spec, max_bytes=plan.limit)
        grad_seeds = gradient_seeds(problem, outputs) if with_gradients else None
        acc = layout.accumulator(groups, columns, num_g)
    names = [n for n in problem.params if acc.wanted(n)]
    advance = counter(progress, "gram", len(names))
    handled: set[str] = set()
    if ghost:
        handled = ghost_rules.contribute(problem, names, columns, grad_seeds, acc, plan, layout)
        if handled:
            advance(len(handled))
    rest = [n for n in names if n not in handled]
    if rest:
        rows.contribute(problem, rest, columns, grad_seeds, acc, plan, layout, advance)
    return acc, columns, outputs


def compute_gram(problem, groups: Sequence[tuple[str, Sequence[str]]], columns: Columns | None = None,
                 with_gradients: bool = False, mc_samples: int = 0, subsample: int | None = None, seed: int = 0,
                 ghost: bool = True, plan: MemoryPlan | None = None, progress: Progress | None = None,
                 process_group: ProcessGroup | None = None) -> tuple[list[GroupGram], Columns, Tensor]:
    """Gram blocks for each group in one pass over the parameters.

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        groups: ``(name, parameter names)`` pairs; a parameter may belong to several groups (e.g. ``all`` and
            its layer), each receives its contribution.
        columns: the columns of V to use (default: built from ``mc_samples``, ``subsample`` and ``seed``).
        with_gradients: also accumulate ``vg`` and ``gg`` (for directional derivatives).
        mc_samples: 0 for the exact loss-Hessian square root, M > 0 for M Monte-Carlo columns per sample.
        subsample: curvature from the first ``subsample`` samples of the batch only (default: all).
        seed: seeds the Monte-Carlo columns.
        ghost: use the fast per-layer rules where they are cheaper (``False``: generic path only).
        plan: the memory plan that sizes chunks and blocks (default: :meth:`MemoryPlan.default` for the device).
        progress: :class:`~curvscope.progress.Progress`; stage ``"gram"`` counts the parameter tensors finished.
        process_group: an initialized ``torch.distributed`` group (collective: every rank passes the same full
            problem and arguments). Each rank computes its block rows; the full Gram blocks are then assembled on
            every rank (``compute_spectrum`` keeps each group's Gram on one rank instead). ``columns`` cannot be
            given with a process group.

    Returns:
        ``(group_grams, columns, outputs)``: outputs ``(N, C)`` of the model at the problem's parameters.
    """
    if process_group is not None and columns is not None:
        raise CurvscopeError("compute_gram: pass mc_samples/subsample/seed, not columns, with a process_group")
    spec = ColumnSpec(mc_samples=mc_samples, subsample=subsample, seed=seed)
    layout = make_layout(problem, process_group)
    acc, columns, outputs = gram_rows(problem, groups, layout, columns=columns, with_gradients=with_gradients,
                                      spec=spec, ghost=ghost, plan=plan, progress=progress)
    grams = layout.assemble(acc, columns, [0] * len(groups))
    return [layout.broadcast(g, 0) for g in grams], columns, outputs


def materialize_columns(problem, param_names: Sequence[str], spec: ColumnSpec | None = None) -> dict[str, Tensor]:
    """The rows of ``V`` for ``param_names``: name -> ``(num_columns, *param.shape)``, columns sample-major, V built
    as ``spec`` says (default :class:`~curvscope.curvature.gram.columns.ColumnSpec`: exact, every sample).

    Materializes them: use it for small parameter sets (the factors engine's GGN source), not for spectra.
    """
    columns = make_columns(problem, spec=spec)
    plan = MemoryPlan.default(problem.device)
    rows_of = rows.rows_by_sample_chunks(problem, list(param_names), columns.samples, columns, plan)
    return {k: v.reshape(columns.num_columns, *problem.params[k].shape) for k, v in rows_of.items()}
