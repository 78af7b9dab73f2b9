"""Where the columns of V live: all in this process, or split over the ranks of a ``torch.distributed`` group.

One concern per module:

- :mod:`.storage`: where the Gram blocks live (:class:`GroupGram`, and :class:`GramAccumulator`, the rows of every
  group's extended Gram held here);
- :mod:`.strategy`: how the columns are paired and blocked: the :class:`Layout` interface that the Gram pass, the
  spectrum and the Newton step work against, and :class:`LocalLayout` (every column in this process);
- :mod:`.sharded`: :class:`ShardedLayout`, each rank of a ``torch.distributed`` group its slice of the samples
  (it holds a :class:`~curvscope.curvature.distributed.Comm` for the collectives).

:func:`make_layout` picks one.
"""

from __future__ import annotations

from typing import Any

from curvscope.curvature.gram.layout.sharded import ShardedLayout, shard_bounds
from curvscope.curvature.gram.layout.storage import GramAccumulator, GroupGram
from curvscope.curvature.gram.layout.strategy import Compute, Contract, Layout, LocalLayout


def make_layout(problem, process_group: Any = None, check: bool = True) -> Layout:
    """:class:`LocalLayout` without a process group, else this rank's :class:`ShardedLayout` (collective; with
    ``check`` every rank must pass the same problem)."""
    if process_group is None:
        return LocalLayout(problem.batch_size, problem.device)
    return ShardedLayout.create(process_group, problem, check=check)


__all__ = ["Compute", "Contract", "GramAccumulator", "GroupGram", "Layout", "LocalLayout", "ShardedLayout",
           "make_layout", "shard_bounds"]
