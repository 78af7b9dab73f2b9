"""The Gram matrix ``V^T V`` of the GGN's columns, per parameter group, without forming the GGN or all of V.

Rows and columns of the *extended* Gram are indexed by two kinds of backpropagated vectors:

- ``v`` columns: ``v_nc = J_n^T s_nc / sqrt(N_V)`` (``CURVATURE.md`` section 2), ``N_V * K`` of them;
- ``g`` columns: per-sample gradients ``g_n = J_n^T dl_n/df_n``, ``N`` of them (only when directional quantities
  are wanted).

For a parameter group P the engine accumulates ``vv = V_P^T V_P`` ``(N_V*K, N_V*K)``, ``vg = V_P^T G_P``
``(N_V*K, N)`` and ``gg = G_P^T G_P`` ``(N, N)`` as sums of per-parameter-tensor contributions. Each tensor's
rows of V are materialized with ``torch.func`` (``vmap`` over samples and columns of ``vjp``), contracted and
discarded: the generic path, valid for any differentiable model. Layers with a fast rule (``ghost.py``) add
their contributions without materializing rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap

from curvscope.curvature.columns import Columns, gradient_seeds, make_columns
from curvscope.curvature.memory import MemoryPlan


@dataclass
class GroupGram:
    """Accumulated Gram blocks of one parameter group (float64)."""

    name: str
    param_names: tuple[str, ...]
    vv: Tensor
    vg: Tensor | None = None
    gg: Tensor | None = None


Adder = Callable[[str, Tensor, "Tensor | None", "Tensor | None"], None]


class GramAccumulator:
    """Adds per-parameter contributions into the Gram blocks of every group that contains the parameter."""

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

    def add(self, name: str, vv: Tensor, vg: Tensor | None = None, gg: Tensor | None = None) -> None:
        for g in self.owners.get(name, ()):
            g.vv += vv.to(torch.float64)
            if g.vg is not None and vg is not None:
                g.vg += vg.to(torch.float64)
                g.gg += gg.to(torch.float64)


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


def _generic_contributions(problem, names: list[str], columns: Columns, grad_seeds: Tensor | None,
                           acc: GramAccumulator, plan: MemoryPlan, progress: Callable[[int], None]) -> None:
    """Generic path: materialize rows of V (and G) for chunks of parameters and samples, contract, discard."""
    N_V, K = columns.num_samples, columns.per_sample
    same_samples = grad_seeds is not None and N_V == problem.batch_size
    for chunk in plan.param_chunks(names, problem.params, rows=N_V * K + (problem.batch_size if grad_seeds
                                                                            is not None else 0)):
        if same_samples:
            # one pass: the gradient seed is an extra column of every sample
            seeds = torch.cat([columns.seeds, grad_seeds], dim=1)
            rows = _rows_by_sample_chunks(problem, chunk, columns.samples, seeds, plan)
            for name in chunk:
                W = rows[name].reshape(N_V, K + 1, -1)
                V = W[:, :K].reshape(N_V * K, -1)
                G = W[:, K]
                acc.add(name, V @ V.T, V @ G.T, G @ G.T)
        else:
            rows = _rows_by_sample_chunks(problem, chunk, columns.samples, columns.seeds, plan)
            grows = None
            if grad_seeds is not None:
                all_idx = torch.arange(problem.batch_size, device=problem.device)
                grows = _rows_by_sample_chunks(problem, chunk, all_idx, grad_seeds, plan)
            for name in chunk:
                V = rows[name].reshape(N_V * K, -1)
                if grows is None:
                    acc.add(name, V @ V.T)
                else:
                    G = grows[name].reshape(problem.batch_size, -1)
                    acc.add(name, V @ V.T, V @ G.T, G @ G.T)
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
                 progress: Callable[[int], None] | None = None) -> tuple[list[GroupGram], Columns, Tensor]:
    """Gram blocks for each group in one pass over the parameters.

    Args:
        groups: ``(name, parameter names)`` pairs; a parameter may belong to several groups (e.g. ``all`` and
            its layer), each receives its contribution.
        with_gradients: also accumulate ``vg`` and ``gg`` (for directional derivatives).
        ghost: use the fast per-layer rules where they are cheaper (``False``: generic path only).
        progress: called with the number of parameter tensors finished.
    Returns:
        ``(group_grams, columns, outputs)``: outputs ``(N, C)`` of the model at the problem's parameters.
    """
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


def apply_v(problem, columns: Columns, coefficients: Tensor, names: Sequence[str] | None = None
            ) -> dict[str, Tensor]:
    """``V c`` as parameter-shaped tensors, for coefficient vectors ``c``: ``(num_columns,)`` or ``(num_columns, k)``
    (then a leading dim ``k`` is added). One batched VJP: ``V c = sum_n J_n^T (sum_k seeds[n, k] c[n, k])``.

    Parameters outside ``names`` (default: all) are not differentiated and come back as zeros.
    """
    names = list(problem.params) if names is None else list(names)
    single = coefficients.dim() == 1
    coeff = coefficients.unsqueeze(-1) if single else coefficients  # (NK, k)
    N_V, K = columns.num_samples, columns.per_sample
    coeff = coeff.to(columns.seeds.dtype).reshape(N_V, K, -1)
    cotangents = torch.einsum("nkc,nkj->jnc", columns.seeds, coeff)  # (k, N_V, C)
    chosen = {k: problem.params[k] for k in names}
    frozen = {**problem.buffers, **{k: v for k, v in problem.params.items() if k not in chosen}}
    inputs = problem.inputs[columns.samples]

    def f(p: dict[str, Tensor]) -> Tensor:
        return functional_call(problem.model, {**frozen, **p}, (inputs,))

    _, pullback = vjp(f, chosen)
    out = vmap(pullback)(cotangents)[0]
    full = {k: out[k] if k in out else torch.zeros(coeff.shape[-1], *v.shape, dtype=v.dtype, device=v.device)
            for k, v in problem.params.items()}
    return {k: v[0] for k, v in full.items()} if single else full
