"""How the columns of V are paired and blocked: the :class:`Layout` interface and :class:`LocalLayout`.

The Gram pass (:mod:`..accumulate`: the rows of :mod:`..rows` and the ghost rules of :mod:`..ghost`), the
spectrum driver (:mod:`..spectrum`) and the Newton step (:mod:`..newton`) work against one small interface,
:class:`Layout`, and never ask which layout they have:

- which columns are here: :meth:`~Layout.curvature_range`, :meth:`~Layout.held_columns`;
- the Gram rows held here and the block pairs to contract into them: :meth:`~Layout.accumulator`,
  :meth:`~Layout.pairwise`;
- batch quantities: :meth:`~Layout.outputs`, :meth:`~Layout.gradient`, :meth:`~Layout.loss_value`;
- gathering results: :meth:`~Layout.assemble`, :meth:`~Layout.broadcast`, :meth:`~Layout.all_reduce_sum`,
  :meth:`~Layout.all_reduce_max`, :meth:`~Layout.common_plan`;
- local work whose failure every process must learn of: :meth:`~Layout.stage`.

:class:`LocalLayout`: every column in this process. The accumulator holds every row; the column blocks are
contracted once per pair ``i <= j`` and each off-diagonal block is mirrored. The other layout,
:class:`~curvscope.curvature.gram.layout.sharded.ShardedLayout`, splits the columns over the ranks of a
``torch.distributed`` group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from curvscope.curvature.gram.columns import Columns
from curvscope.curvature.gram.layout.storage import GramAccumulator, GroupGram
from curvscope.curvature.memory import ColumnBlock, MemoryPlan, column_blocks, pairwise

Compute = Callable[[ColumnBlock], Any]
"""``compute(block) -> factors``: what a contraction needs of a block's columns (rows of V, ghost factors)."""
Contract = Callable[[ColumnBlock, Any, ColumnBlock, Any], None]
"""``contract(block_i, factors_i, block_j, factors_j)``: add their Gram block to an accumulator."""


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
