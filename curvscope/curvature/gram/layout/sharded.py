"""Columns of V sharded over the ranks of a ``torch.distributed`` group: :class:`ShardedLayout`.

Every rank holds the same :class:`~curvscope.problem.Problem` (the model and the whole batch of N samples: the
inputs are small next to V) and works on its contiguous slice of the samples: rank r of R owns the batch samples
``[r N // R, (r + 1) N // R)`` (forward pass, per-sample gradients) and the curvature samples
``[r N_V // R, (r + 1) N_V // R)`` of the ``N_V`` samples that build V, i.e. the columns ``v_nk`` of those
samples. Nobody holds all of V:

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

The layout *has* a communicator (:class:`~curvscope.curvature.distributed.Comm`: the collectives and the agreement
on errors) and delegates to it; it adds which columns are whose and what each rank computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.distributed import Comm
from curvscope.curvature.gram.columns import Columns
from curvscope.curvature.gram.layout.storage import GramAccumulator, GroupGram, zero_gram
from curvscope.curvature.gram.layout.strategy import Compute, Contract
from curvscope.curvature.memory import ColumnBlock, MemoryPlan, column_blocks
from curvscope.errors import CurvscopeError


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
class ShardedLayout:
    """One rank's part of a problem: contiguous slices of the batch and of the curvature samples.

    Attributes:
        comm: the communicator of the process group (collectives, error agreement); the layout delegates to it.
        num_samples: N, the batch size; batch_bounds: ``(R + 1,)`` boundaries of the ranks' batch slices.
    """

    comm: Comm
    num_samples: int = 0
    batch_bounds: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, process_group: Any, problem, check: bool = True) -> ShardedLayout:
        """The layout of ``problem`` on this rank. With ``check`` (a collective), refuses ranks whose problems
        differ (every rank must pass the same full batch and parameters)."""
        comm = Comm.create(process_group, problem.device)
        layout = cls(comm, problem.batch_size, shard_bounds(problem.batch_size, comm.world))
        if check:
            with comm.stage():
                mine = _fingerprint(problem)
            every = comm.all_gather_rows(mine.unsqueeze(0).to(comm.comm_device), list(range(comm.world + 1)))
            every = every.cpu()
            for r in range(comm.world):
                same = bool((every[r, :4] == every[0, :4]).all()) and bool(torch.allclose(
                    every[r, 4:], every[0, 4:], rtol=1e-6, atol=0.0))
                if not same:
                    raise CurvscopeError(
                        f"process_group: rank {r}'s problem differs from rank 0's ({_sizes(every[r])} vs "
                        f"{_sizes(every[0])}, or other values): every rank must pass the same model and full batch")
        return layout

    # -- the communicator's ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This rank in the group."""
        return self.comm.rank

    @property
    def world(self) -> int:
        """R, the number of ranks."""
        return self.comm.world

    @property
    def device(self) -> torch.device:
        """Where results live (the problem's device)."""
        return self.comm.device

    def stage(self) -> AbstractContextManager[None]:
        """Local work whose failure every rank learns of (:meth:`Comm.stage`)."""
        return self.comm.stage()

    def all_reduce_sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Same-named tensors summed over the ranks (:meth:`Comm.all_reduce_sum`)."""
        return self.comm.all_reduce_sum(tensors)

    def all_reduce_max(self, value: float) -> float:
        """The largest ``value`` of all ranks (:meth:`Comm.all_reduce_max`)."""
        return self.comm.all_reduce_max(value)

    def sum_to_all(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` summed, bitwise the same on every rank (:meth:`Comm.sum_to_all`)."""
        return self.comm.sum_to_all(t)

    def broadcast(self, obj: Any, src: int) -> Any:
        """``obj`` (tensors, dataclasses, containers) from rank ``src`` to every rank (:meth:`Comm.broadcast_tree`)."""
        return self.comm.broadcast_tree(obj, src)

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
        return MemoryPlan(budget=int(self.comm.all_reduce_min(float(plan.budget))),
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
                    factors = self.comm.broadcast_tree(factors, src)
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
                    full = zero_gram(mine.name, mine.param_names, acc.num_v, num_g, self.device, acc.num_v,
                                     num_g if with_gg else None)
            for r in range(self.world):
                for attr, b in parts:
                    if b[r + 1] == b[r]:
                        continue
                    if self.rank == owner == r:
                        getattr(full, attr)[b[r]:b[r + 1]] = getattr(mine, attr)
                    elif self.rank == r:
                        self.comm.send(getattr(mine, attr), owner)
                    elif self.rank == owner:
                        self.comm.recv_into(getattr(full, attr)[b[r]:b[r + 1]], r)
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
        return self.comm.all_gather_rows(local, self.batch_bounds)

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
