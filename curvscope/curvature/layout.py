"""Where the columns of V live: all in this process, or split over the ranks of a ``torch.distributed`` group.

The Gram pass (``gram.py``: the generic path of ``generic.py`` and the ghost rules of ``ghost.py``), the spectrum
driver (``spectrum.py``) and the Newton step (``newton.py``) work against one small interface, :class:`Layout`,
and never ask which layout they have:

- which columns are here: :meth:`~Layout.curvature_range`, :meth:`~Layout.held_columns`;
- the Gram rows held here and the block pairs to contract into them: :meth:`~Layout.accumulator`,
  :meth:`~Layout.pairwise`;
- batch quantities: :meth:`~Layout.outputs`, :meth:`~Layout.gradient`, :meth:`~Layout.loss_value`;
- gathering results: :meth:`~Layout.assemble`, :meth:`~Layout.broadcast`, :meth:`~Layout.all_reduce_sum`,
  :meth:`~Layout.all_reduce_max`, :meth:`~Layout.common_plan`;
- local work whose failure every process must learn of: :meth:`~Layout.stage`.

The extended Gram ``[V, G]^T [V, G]`` (``docs/conventions.md`` §2, §4) has rows and columns indexed by the
columns of V (``n * K + k``) and then by the per-sample gradients (``N_V * K + m``), see
:class:`~curvscope.curvature.memory.ColumnBlock`. A :class:`GramAccumulator` holds some of its rows per group.

:class:`LocalLayout`: every column in this process. The accumulator holds every row; the column blocks are
contracted once per pair ``i <= j`` and each off-diagonal block is mirrored.

:class:`ShardedLayout`: every rank holds the same :class:`~curvscope.problem.Problem` (the model and the whole
batch of N samples: the inputs are small next to V) and works on its contiguous slice of the samples: rank r of R
owns the batch samples ``[r N // R, (r + 1) N // R)`` (forward pass, per-sample gradients) and the curvature
samples ``[r N_V // R, (r + 1) N_V // R)`` of the ``N_V`` samples that build V, i.e. the columns ``v_nk`` of
those samples. Nobody holds all of V:

- Gram: for each stage (all ghost layers together, then one parameter chunk of the generic path at a time)
  every rank computes the factors of its own columns (layer inputs ``a`` and deltas, or materialized rows of V).
  Then each rank in turn *broadcasts* its factors and every rank contracts them with its own: rank r accumulates
  its *block row* of the extended Gram (its rows of ``vv``, ``vg``, ``gg`` against all columns). A rank holds
  its own factors and one visiting rank's at a time.
- Eigen-decomposition: group i's block rows are sent to rank ``i mod R`` (:meth:`~ShardedLayout.assemble`), which
  alone holds that group's ``(N_V K)^2`` Gram, decomposes it and computes the directional quantities; the
  results are broadcast, so every rank returns the same result.
- Batch loss and gradient: the outputs ``(N, C)`` are all-gathered (so that the columns and Monte-Carlo draws are
  exactly the single-process ones), the gradient is all-reduced.

Collectives and the agreement on errors are :class:`~curvscope.curvature.distributed.Comm`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from curvscope.curvature.columns import Columns
from curvscope.curvature.distributed import Comm
from curvscope.curvature.memory import ColumnBlock, MemoryPlan, column_blocks, pairwise
from curvscope.errors import CurvscopeError

Compute = Callable[[ColumnBlock], Any]
"""``compute(block) -> factors``: what a contraction needs of a block's columns (rows of V, ghost factors)."""
Contract = Callable[[ColumnBlock, Any, ColumnBlock, Any], None]
"""``contract(block_i, factors_i, block_j, factors_j)``: add their Gram block to an accumulator."""


# -- the Gram rows held here -----------------------------------------------------------------------------------

@dataclass
class GroupGram:
    """Gram blocks of one parameter group (float64): ``vv = V_P^T V_P`` ``(N_V*K, N_V*K)``, ``vg = V_P^T G_P``
    ``(N_V*K, N)`` and ``gg = G_P^T G_P`` ``(N, N)``, or some of their rows (a :class:`GramAccumulator`'s)."""

    name: str
    param_names: tuple[str, ...]
    vv: Tensor
    vg: Tensor | None = None
    gg: Tensor | None = None


class GramAccumulator:
    """Rows of every group's extended Gram, and which groups own each parameter.

    Holds the rows ``[v_start, v_start + n_v)`` of ``vv`` and ``vg`` and ``[g_start, g_start + n_g)`` of ``gg``
    against every column (all rows for a local layout). Contributions are added block by block (:meth:`add`).

    Args:
        groups: ``(name, parameter names)`` pairs; num_v: V columns in all (``N_V * K``); num_g: gradient
            columns (N), or ``None`` for ``vv`` only.
        v_rows, g_rows: the ``(start, stop)`` rows held (default: all).
        symmetric: the layout contracts each pair of blocks once (``i <= j``): :meth:`add` also fills the
            mirror image of an off-diagonal block. ``False`` for block rows, which see every pair themselves.

    Attributes:
        rules: module name -> ``"ghost"`` or ``"materialize"`` for the layers a fast rule contributed (the
            other parameters' rows came from the generic path).
    """

    def __init__(self, groups: Sequence[tuple[str, Sequence[str]]], num_v: int, num_g: int | None,
                 device: torch.device, v_rows: tuple[int, int] | None = None,
                 g_rows: tuple[int, int] | None = None, symmetric: bool = True):
        self.num_v, self.symmetric = num_v, symmetric
        self.v_start, v_stop = (0, num_v) if v_rows is None else v_rows
        self.g_start, g_stop = (0, num_g or 0) if g_rows is None else g_rows
        self.groups = [_zeros(name, names, num_v, num_g, device, v_stop - self.v_start, g_stop - self.g_start)
                       for name, names in groups]
        self.owners: dict[str, list[GroupGram]] = {}
        self.rules: dict[str, str] = {}
        for g in self.groups:
            for n in g.param_names:
                self.owners.setdefault(n, []).append(g)

    def wanted(self, name: str) -> bool:
        """Some group owns the parameter ``name`` (contributions of other parameters are not needed)."""
        return name in self.owners

    def owner_sets(self, names: Sequence[str]) -> list[tuple[list[GroupGram], list[str]]]:
        """``names`` grouped by the groups that own them: contributions within a set are summed before adding."""
        sets: dict[tuple[int, ...], tuple[list[GroupGram], list[str]]] = {}
        for n in names:
            owners = self.owners.get(n, [])
            sets.setdefault(tuple(id(g) for g in owners), (owners, []))[1].append(n)
        return [s for s in sets.values() if s[0]]

    def add(self, groups: Sequence[GroupGram], bi: ColumnBlock, bj: ColumnBlock, block: Tensor) -> None:
        """Add the Gram block ``(bi.num_columns, bj.num_columns)`` of the columns ``bi`` x ``bj`` to ``groups``
        (and its transpose at ``bj`` x ``bi`` when symmetric and ``bi is not bj``).

        Entries with a g row and a v column are the mirror images of ``vg`` entries and are skipped.
        """
        block = block.to(torch.float64)
        pairs = [(bi.index, bj.index, block)]
        if self.symmetric and bi is not bj:
            pairs.append((bj.index, bi.index, block.T))
        num_v = self.num_v
        for rows, cols, b in pairs:
            rv, cv = rows < num_v, cols < num_v
            parts = [("vv", rows[rv] - self.v_start, cols[cv], rv, cv)]
            if groups[0].vg is not None:
                parts += [("vg", rows[rv] - self.v_start, cols[~cv] - num_v, rv, ~cv),
                          ("gg", rows[~rv] - num_v - self.g_start, cols[~cv] - num_v, ~rv, ~cv)]
            for attr, ri, ci, rmask, cmask in parts:
                if not (ri.numel() and ci.numel()):
                    continue
                sub = b[rmask][:, cmask]
                rs, cs = _as_slice(ri), _as_slice(ci)
                for g in groups:
                    target = getattr(g, attr)
                    if rs is not None and cs is not None:
                        target[rs, cs] += sub
                    else:
                        target.index_put_((ri.unsqueeze(1), ci.unsqueeze(0)), sub, accumulate=True)


def _zeros(name: str, param_names: Sequence[str], num_v: int, num_g: int | None, device: torch.device,
           v_rows: int, g_rows: int | None) -> GroupGram:
    """A zero :class:`GroupGram` with ``v_rows`` rows of ``vv``/``vg`` and ``g_rows`` of ``gg`` (no ``gg`` for
    ``None``; no ``vg``/``gg`` without gradient columns)."""

    def zeros(rows: int, cols: int) -> Tensor:
        return torch.zeros(rows, cols, dtype=torch.float64, device=device)

    return GroupGram(name, tuple(param_names), zeros(v_rows, num_v), None if num_g is None else zeros(v_rows, num_g),
                     None if num_g is None or g_rows is None else zeros(g_rows, num_g))


def _as_slice(index: Tensor) -> slice | None:
    """``index`` ``(r,)`` as a slice when it is a run of consecutive integers (the usual case), else None."""
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == index.numel() and bool((index.diff() == 1).all()):
        return slice(first, last + 1)
    return None


# -- the interface ---------------------------------------------------------------------------------------------

class Layout(Protocol):
    """How the columns of V are laid out over processes (see the module docstring). ``rank`` of ``world``."""

    rank: int
    world: int

    def stage(self) -> AbstractContextManager[None]:
        """Run local work; on leaving, every process agrees that none failed (else all raise the same error)."""
        ...

    def curvature_range(self, columns: Columns) -> tuple[int, int]:
        """The curvature samples ``[c0, c1)`` (positions in ``columns``) whose columns are here."""
        ...

    def held_columns(self, columns: Columns, num_g: int | None) -> int:
        """Columns of ``[V, G]`` whose factors are in memory at once when everything fits (for blocking)."""
        ...

    def common_plan(self, plan: MemoryPlan) -> MemoryPlan:
        """The same plan on every process (so that block sizes agree)."""
        ...

    def accumulator(self, groups: Sequence[tuple[str, Sequence[str]]], columns: Columns, num_g: int | None
                    ) -> GramAccumulator:
        """Zeros for the Gram rows held here."""
        ...

    def pairwise(self, columns: Columns, grad_seeds: Tensor | None, max_columns: int, compute: Compute,
                 contract: Contract, held: int) -> None:
        """Cut the columns here into blocks of ``max_columns`` and call ``contract`` for every pair of blocks the
        accumulator's rows need, with ``held`` blocks' factors kept at a time."""
        ...

    def outputs(self, problem) -> Tensor:
        """The model's outputs ``(N, C)`` on the whole batch (no autograd), on every process."""
        ...

    def gradient(self, problem) -> dict[str, Tensor]:
        """The batch gradient ``g = dL/dtheta`` by name, on every process."""
        ...

    def loss_value(self, problem, params: dict[str, Tensor] | None = None) -> float:
        """The batch loss ``L`` at ``params`` (default: the problem's), on every process."""
        ...

    def assemble(self, acc: GramAccumulator, columns: Columns, owners: Sequence[int], with_gg: bool = True
                 ) -> list[GroupGram | None]:
        """Group i's full Gram on process ``owners[i]``, ``None`` elsewhere (``with_gg=False``: without ``gg``).
        Empties ``acc.groups`` as it goes."""
        ...

    def broadcast(self, obj: Any, src: int) -> Any:
        """``obj`` (tensors, dataclasses, containers) from process ``src`` to every process."""
        ...

    def all_reduce_sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Same-named tensors summed over processes."""
        ...

    def all_reduce_max(self, value: float) -> float:
        """The largest ``value`` of all processes."""
        ...


def make_layout(problem, process_group: Any = None, check: bool = True) -> Layout:
    """:class:`LocalLayout` without a process group, else this rank's :class:`ShardedLayout` (collective; with
    ``check`` every rank must pass the same problem)."""
    if process_group is None:
        return LocalLayout(problem.batch_size, problem.device)
    return ShardedLayout.create(process_group, problem, check=check)


# -- all columns in this process -------------------------------------------------------------------------------

@dataclass
class LocalLayout:
    """Every column of V in this process: the single-process engine."""

    batch_size: int
    device: torch.device
    rank: int = 0
    world: int = 1

    def stage(self) -> AbstractContextManager[None]:
        """A no-op context: with one process there is no one to agree with."""
        return contextlib.nullcontext()

    def curvature_range(self, columns: Columns) -> tuple[int, int]:
        """All curvature samples: ``(0, N_V)``."""
        return 0, columns.num_samples

    def held_columns(self, columns: Columns, num_g: int | None) -> int:
        """Every column of ``[V, G]``: ``N_V * K`` plus ``num_g`` (if any)."""
        return columns.num_columns + (num_g or 0)

    def common_plan(self, plan: MemoryPlan) -> MemoryPlan:
        """``plan`` itself."""
        return plan

    def accumulator(self, groups: Sequence[tuple[str, Sequence[str]]], columns: Columns, num_g: int | None
                    ) -> GramAccumulator:
        """Zeros for every row of every group's Gram."""
        return GramAccumulator(groups, columns.num_columns, num_g, self.device)

    def pairwise(self, columns: Columns, grad_seeds: Tensor | None, max_columns: int, compute: Compute,
                 contract: Contract, held: int) -> None:
        """Every pair of blocks ``i <= j`` of all the columns, as :func:`~curvscope.curvature.memory.pairwise`."""
        pairwise(column_blocks(columns, grad_seeds, max_columns), compute, contract, held)

    def outputs(self, problem) -> Tensor:
        """The model's outputs ``(N, C)`` on the batch, without autograd."""
        with torch.no_grad():
            return problem.forward()

    def gradient(self, problem) -> dict[str, Tensor]:
        """The batch gradient by name (:meth:`Problem.gradient <curvscope.problem.Problem.gradient>`)."""
        return problem.gradient()

    def loss_value(self, problem, params: dict[str, Tensor] | None = None) -> float:
        """The batch loss at ``params`` (default: the problem's), without autograd."""
        with torch.no_grad():
            return float(problem.loss_value(params))

    def assemble(self, acc: GramAccumulator, columns: Columns, owners: Sequence[int], with_gg: bool = True
                 ) -> list[GroupGram | None]:
        """Every group's full Gram, here (the accumulator holds every row); ``with_gg=False`` drops ``gg``.
        Empties ``acc.groups``."""
        grams: list[GroupGram | None] = list(acc.groups)
        acc.groups = []
        if not with_gg:
            for g in grams:
                g.gg = None
        return grams

    def broadcast(self, obj: Any, src: int) -> Any:
        """``obj`` itself."""
        return obj

    def all_reduce_sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` themselves."""
        return tensors

    def all_reduce_max(self, value: float) -> float:
        """``value`` itself."""
        return value


# -- columns sharded over a torch.distributed group ------------------------------------------------------------

def shard_bounds(n: int, world: int) -> list[int]:
    """``(R + 1,)`` boundaries: rank r owns ``[b[r], b[r + 1])`` of n items (sizes differ by at most one)."""
    return [r * n // world for r in range(world + 1)]


def _fingerprint(problem) -> Tensor:
    """``(9,)`` float64: sizes and sums of the batch and parameters, to check that every rank has the same."""
    inputs, targets = problem.inputs.detach().double(), problem.targets.detach().double()
    params = [p.detach().double() for p in problem.params.values()]
    return torch.tensor([problem.batch_size, problem.num_outputs, problem.num_params, len(params),
                         float(inputs.sum()), float(inputs.abs().sum()), float(targets.abs().sum()),
                         float(sum(p.sum() for p in params)), float(sum(p.abs().sum() for p in params))],
                        dtype=torch.float64)


def _sizes(f: Tensor) -> str:
    return f"{int(f[0])} samples, {int(f[1])} outputs, {int(f[2]):,} parameters"


@dataclass
class ShardedLayout(Comm):
    """One rank's part of a problem: contiguous slices of the batch and of the curvature samples."""

    num_samples: int = 0
    batch_bounds: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, process_group: Any, problem, check: bool = True) -> ShardedLayout:
        """The layout of ``problem`` on this rank. With ``check`` (a collective), refuses ranks whose problems
        differ (every rank must pass the same full batch and parameters)."""
        comm = Comm.create(process_group, problem.device)
        layout = cls(comm.group, comm.rank, comm.world, comm.device, comm.comm_device, problem.batch_size,
                     shard_bounds(problem.batch_size, comm.world))
        if check:
            with layout.stage():
                mine = _fingerprint(problem)
            every = layout.all_gather_rows(mine.unsqueeze(0).to(layout.comm_device), list(range(layout.world + 1)))
            every = every.cpu()
            for r in range(layout.world):
                same = bool((every[r, :4] == every[0, :4]).all()) and bool(torch.allclose(
                    every[r, 4:], every[0, 4:], rtol=1e-6, atol=0.0))
                if not same:
                    raise CurvscopeError(
                        f"process_group: rank {r}'s problem differs from rank 0's ({_sizes(every[r])} vs "
                        f"{_sizes(every[0])}, or other values): every rank must pass the same model and full batch")
        return layout

    # -- which columns are here ----------------------------------------------------------------------------
    def batch_range(self, rank: int | None = None) -> tuple[int, int]:
        """The batch samples ``[b0, b1)`` of rank ``rank`` (default: this rank)."""
        r = self.rank if rank is None else rank
        return self.batch_bounds[r], self.batch_bounds[r + 1]

    def curvature_bounds(self, columns: Columns) -> list[int]:
        """``(R + 1,)`` boundaries of the ranks' slices of the ``N_V`` curvature samples."""
        return shard_bounds(columns.num_samples, self.world)

    def curvature_range(self, columns: Columns, rank: int | None = None) -> tuple[int, int]:
        """The curvature samples ``[c0, c1)`` (positions in ``columns``) of rank ``rank`` (default: this rank)."""
        b = self.curvature_bounds(columns)
        r = self.rank if rank is None else rank
        return b[r], b[r + 1]

    def local_columns(self, columns: Columns, num_g: int | None, rank: int | None = None) -> int:
        """How many columns of ``[V, G]`` rank ``rank`` (default: this rank) owns: K per curvature sample, plus one
        per batch sample with gradients (``num_g`` not ``None``)."""
        c0, c1 = self.curvature_range(columns, rank)
        b0, b1 = self.batch_range(rank)
        return (c1 - c0) * columns.per_sample + ((b1 - b0) if num_g is not None else 0)

    def held_columns(self, columns: Columns, num_g: int | None) -> int:
        """A rank's own columns and one visitor's."""
        return 2 * max(self.local_columns(columns, num_g, r) for r in range(self.world))

    def common_plan(self, plan: MemoryPlan) -> MemoryPlan:
        """The smallest budget of all ranks."""
        return MemoryPlan(budget=int(self.all_reduce_min(float(plan.budget))),
                          activation_factor=plan.activation_factor)

    # -- the block rows ------------------------------------------------------------------------------------
    def accumulator(self, groups: Sequence[tuple[str, Sequence[str]]], columns: Columns, num_g: int | None
                    ) -> GramAccumulator:
        """This rank's block rows: its V columns' rows of ``vv``/``vg``, its samples' rows of ``gg``."""
        c0, c1 = self.curvature_range(columns)
        K = columns.per_sample
        return GramAccumulator(groups, columns.num_columns, num_g, self.device, v_rows=(c0 * K, c1 * K),
                               g_rows=self.batch_range(), symmetric=False)

    def blocks(self, columns: Columns, grad_seeds: Tensor | None, max_columns: int, rank: int | None = None
               ) -> list[ColumnBlock]:
        """Rank ``rank``'s columns of ``[V, G]`` cut into blocks with their global extended indices."""
        return column_blocks(columns, grad_seeds, max_columns, curvature=self.curvature_range(columns, rank),
                             batch=self.batch_range(rank))

    def pairwise(self, columns: Columns, grad_seeds: Tensor | None, max_columns: int, compute: Compute,
                 contract: Contract, held: int) -> None:
        """``contract(own, F_own, other, F_other)`` for each of this rank's blocks and *every* block of every
        rank (this rank's block rows).

        A stripe of ``held`` own blocks is computed and kept; then every rank's blocks are broadcast one at a
        time by their owner (computed again unless in the owner's current stripe) and contracted with the stripe.
        With everything fitting (the usual case) each rank has one block, computed once, and R broadcasts.
        """
        every = [self.blocks(columns, grad_seeds, max_columns, r) for r in range(self.world)]
        mine = every[self.rank]
        stripes = max(1, *(math.ceil(len(b) / held) for b in every))
        for t in range(stripes):
            stripe: list[tuple[ColumnBlock, Any]] = []
            with self.stage():
                stripe = [(b, compute(b)) for b in mine[t * held:(t + 1) * held]]
            for src, blocks in enumerate(every):
                for j, block in enumerate(blocks):
                    factors = None
                    with self.stage():
                        if src == self.rank:
                            k = j - t * held
                            factors = stripe[k][1] if 0 <= k < len(stripe) else compute(block)
                    factors = self.broadcast_tree(factors, src)
                    with self.stage():
                        for own, own_factors in stripe:
                            contract(own, own_factors, block, factors)
                    del factors

    def assemble(self, acc: GramAccumulator, columns: Columns, owners: Sequence[int], with_gg: bool = True
                 ) -> list[GroupGram | None]:
        """Send every group's block rows to its owner (point to point); a rank's rows are freed once sent."""
        v_bounds = [c * columns.per_sample for c in self.curvature_bounds(columns)]
        out: list[GroupGram | None] = []
        for i, owner in enumerate(owners):
            mine = acc.groups[i]
            parts = [("vv", v_bounds)]
            if mine.vg is not None:
                parts += [("vg", v_bounds)] + ([("gg", self.batch_bounds)] if with_gg else [])
            full = None
            with self.stage():
                if self.rank == owner:
                    num_g = None if mine.gg is None else mine.gg.shape[1]
                    full = _zeros(mine.name, mine.param_names, acc.num_v, num_g, self.device, acc.num_v,
                                  num_g if with_gg else None)
            for r in range(self.world):
                for attr, b in parts:
                    if b[r + 1] == b[r]:
                        continue
                    if self.rank == owner == r:
                        getattr(full, attr)[b[r]:b[r + 1]] = getattr(mine, attr)
                    elif self.rank == r:
                        self.send(getattr(mine, attr), owner)
                    elif self.rank == owner:
                        self.recv_into(getattr(full, attr)[b[r]:b[r + 1]], r)
            acc.groups[i] = None  # type: ignore[call-overload]
            out.append(full)
        return out

    # -- batch quantities ----------------------------------------------------------------------------------
    def outputs(self, problem) -> Tensor:
        """Each rank's forward pass on its batch samples, all-gathered."""
        b0, b1 = self.batch_range()
        with self.stage():
            with torch.no_grad():
                local = problem.forward(inputs=problem.inputs[b0:b1]) if b1 > b0 else torch.zeros(
                    0, problem.num_outputs, dtype=problem.dtype, device=problem.device)
        return self.all_gather_rows(local, self.batch_bounds)

    def loss_value(self, problem, params: dict[str, Tensor] | None = None) -> float:
        """Per-rank sums of its samples' losses, all-reduced, over N."""
        b0, b1 = self.batch_range()
        with self.stage():
            with torch.no_grad():
                local = torch.zeros((), dtype=torch.float64, device=problem.device)
                if b1 > b0:
                    local = problem.per_sample_loss(params, (b0, b1)).to(torch.float64).sum()
        return float(self.all_reduce_sum({"loss": local.reshape(1)})["loss"][0]) / problem.batch_size

    def gradient(self, problem) -> dict[str, Tensor]:
        """Each rank differentiates ``sum_{n in its samples} l_n / N``; the parts are all-reduced."""
        b0, b1 = self.batch_range()
        with self.stage():
            if b1 > b0:
                def local_loss(params: dict[str, Tensor]) -> Tensor:
                    return problem.per_sample_loss(params, (b0, b1)).sum() / problem.batch_size

                grad = torch.func.grad(local_loss)(problem.params)
            else:
                grad = {n: torch.zeros_like(p) for n, p in problem.params.items()}
        return self.all_reduce_sum(grad)

    def broadcast(self, obj: Any, src: int) -> Any:
        """``obj`` (tensors, dataclasses, containers) from rank ``src`` to every rank (:meth:`Comm.broadcast_tree`)."""
        return self.broadcast_tree(obj, src)
