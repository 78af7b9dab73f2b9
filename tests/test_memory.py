"""Memory budgets: byte sizes, block sizes, the column blocks of [V, G] and the pairs of blocks visited."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, N

from curvscope.curvature.gram.columns import ColumnSpec, gradient_seeds, make_columns
from curvscope.curvature.memory import ColumnBlock, MemoryPlan, column_blocks, pairwise, parse_memory
from curvscope.errors import CurvscopeError


def test_blocking_regimes_and_block_cover():
    plan = MemoryPlan(budget=3000)  # a third: 1000 bytes
    assert plan.blocking(10, 10, 10) == (10, 1)  # one block
    assert plan.blocking(10, 50, 200) == (2, 5)  # 5 blocks of 2 columns, all held: computed once
    assert plan.blocking(100, 50, 100) == (3, 3)  # 34 blocks, 3 held at a time: recomputed
    assert plan.blocking(100, 5000, 100) == (1, 1)  # never below one column
    problem = CASES["rule-linear2d"]()
    out = problem.forward().detach()
    for subsample in (None, 4):
        columns = make_columns(problem, out, ColumnSpec(subsample=subsample))
        total = columns.num_columns + N
        for max_columns in (1, 2, 3, 5, 100):
            blocks = column_blocks(columns, gradient_seeds(problem, out), max_columns)
            index = torch.cat([b.index for b in blocks])
            assert sorted(index.tolist()) == list(range(total))
            assert all(b.num_columns <= max_columns for b in blocks)


@pytest.mark.parametrize("subsample", [None, 4])
def test_column_blocks_of_ranges_partition_the_columns(subsample):
    """Blocks of consecutive sample ranges (a sharded layout's ranks) cover every column once; a gradient column
    goes with its curvature sample when V covers the whole batch, else with its batch range."""
    problem = CASES["rule-linear2d"]()
    out = problem.forward().detach()
    columns = make_columns(problem, out, ColumnSpec(subsample=subsample))
    seeds = gradient_seeds(problem, out)
    K, num_v = columns.per_sample, columns.num_columns
    for max_columns in (1, 2, 4, 100):
        NV = columns.num_samples
        for c_bounds, batch in (([0, NV // 2, NV], [0, 3, N]), ([0, 0, NV], [0, N, N])):
            if subsample is None:
                batch = c_bounds  # the same samples: a rank's gradients are those of its curvature samples
            index = []
            for r in range(2):
                blocks = column_blocks(columns, seeds, max_columns, curvature=(c_bounds[r], c_bounds[r + 1]),
                                       batch=(batch[r], batch[r + 1]))
                for b in blocks:
                    v = b.index[b.index < num_v]
                    assert bool(((v // K >= c_bounds[r]) & (v // K < c_bounds[r + 1])).all())
                    g = b.index[b.index >= num_v] - num_v
                    lo, hi = (c_bounds[r], c_bounds[r + 1]) if subsample is None else (batch[r], batch[r + 1])
                    assert bool(((g >= lo) & (g < hi)).all())
                    assert b.num_columns <= max_columns
                index += [b.index for b in blocks]
            assert sorted(torch.cat(index).tolist()) == list(range(num_v + N))


@pytest.mark.parametrize("held", [1, 2, 3, 7, 8])
def test_pairwise_visits_every_pair_once(held):
    blocks = [ColumnBlock(torch.tensor([i]), torch.zeros(1, 1, 1), torch.tensor([i])) for i in range(7)]
    computed, pairs = [], []
    pairwise(blocks, lambda b: computed.append(int(b.index)) or int(b.index),
             lambda bi, fi, bj, fj: pairs.append((fi, fj)), held)
    assert sorted(pairs) == [(i, j) for i in range(7) for j in range(i, 7)]
    assert len(computed) == (7 if held >= 7 else sum(min(held, 7 - s) + max(0, 7 - s - held)
                                                    for s in range(0, 7, held)))


def test_sample_chunk_never_refuses():
    problem = CASES["rule-linear2d"]()
    plan = MemoryPlan(budget=10)
    assert plan.sample_chunk(problem, list(problem.params), per_sample_rows=4, num_samples=N) == 1


def test_parse_memory():
    assert parse_memory("4GiB") == 4 * 2**30 and parse_memory("512M") == 512 * 2**20
    assert parse_memory("2e9") == 2_000_000_000 and parse_memory(3 * 2**20) == 3 * 2**20
    assert parse_memory(None) is None and parse_memory(" auto ") is None
    with pytest.raises(CurvscopeError, match="^max_memory 'lots': expected a size"):
        parse_memory("lots")
    with pytest.raises(CurvscopeError, match="^max_memory '1k' is below 1 MiB"):
        parse_memory("1k")


def test_byte_counts_in_messages_use_the_largest_unit():
    from curvscope.curvature.memory import format_bytes

    assert format_bytes(129024000) == "123 MiB"
    assert format_bytes(5.4 * 2**30) == "5.4 GiB"
    assert format_bytes(11456 * 2**30) == "11.2 TiB"
    assert format_bytes(512) == "512 B" and format_bytes(2048) == "2 KiB"
