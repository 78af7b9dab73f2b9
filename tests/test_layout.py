"""The column layouts: the Gram rows an accumulator holds and how blocks land in them; a sharded layout's block
rows, simulated rank by rank in one process, stack up to the local Gram; the sharded code path on a one-process
gloo group gives the local results."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cases import CASES
from helpers import assert_same_grams

from curvscope.curvature.distributed import Comm
from curvscope.curvature.gram import compute_gram
from curvscope.curvature.gram import rows as generic
from curvscope.curvature.gram.columns import ColumnSpec, gradient_seeds, make_columns
from curvscope.curvature.gram.layout import GramAccumulator, LocalLayout, ShardedLayout, make_layout, shard_bounds
from curvscope.curvature.gram.newton import newton_step
from curvscope.curvature.gram.spectrum import compute_spectrum, eigenvectors
from curvscope.curvature.memory import ColumnBlock, MemoryPlan

BIG = MemoryPlan(budget=2**30)


def _block(index: list[int]) -> ColumnBlock:
    return ColumnBlock(torch.zeros(len(index), dtype=torch.long), torch.zeros(len(index), 1, 1), torch.tensor(index))


def test_accumulator_mirrors_off_diagonal_blocks_and_skips_g_rows_against_v():
    """num_v = 3 V columns, 2 gradient columns: extended indices 0..2 (v) and 3..4 (g)."""
    full = torch.arange(25, dtype=torch.float64).reshape(5, 5)
    full = full + full.T
    acc = GramAccumulator([("a", ("w",)), ("b", ("w", "u"))], num_v=3, num_g=2, device=torch.device("cpu"))
    assert acc.wanted("w") and acc.wanted("u") and not acc.wanted("x")
    assert [([g.name for g in groups], names) for groups, names in acc.owner_sets(["w", "u"])] == [
        (["a", "b"], ["w"]), (["b"], ["u"])]
    blocks = [_block([0, 2]), _block([1, 3]), _block([4])]  # not contiguous: index_put
    for i, bi in enumerate(blocks):
        for bj in blocks[i:]:
            acc.add(acc.groups[:1], bi, bj, full[bi.index][:, bj.index])
    a, b = acc.groups
    torch.testing.assert_close(a.vv, full[:3, :3], rtol=0, atol=0)
    torch.testing.assert_close(a.vg, full[:3, 3:], rtol=0, atol=0)
    torch.testing.assert_close(a.gg, full[3:, 3:], rtol=0, atol=0)
    assert not b.vv.any() and not b.vg.any() and not b.gg.any()  # only the groups passed are touched


def test_block_rows_take_every_pair_as_given():
    """Rows of V columns [1, 3) and of gradient column 1 (extended index 4) against every column, no mirroring."""
    full = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc = GramAccumulator([("a", ("w",))], num_v=3, num_g=2, device=torch.device("cpu"), v_rows=(1, 3),
                          g_rows=(1, 2), symmetric=False)
    own = _block([1, 2, 4])
    for other in (_block([0, 3]), own):
        acc.add(acc.groups, own, other, full[own.index][:, other.index])
    g = acc.groups[0]
    torch.testing.assert_close(g.vv, full[1:3, :3], rtol=0, atol=0)
    torch.testing.assert_close(g.vg, full[1:3, 3:], rtol=0, atol=0)
    torch.testing.assert_close(g.gg, full[4:, 3:], rtol=0, atol=0)


@pytest.mark.parametrize("subsample", [None, 4])
@pytest.mark.parametrize("world", [2, 3, 7])
def test_simulated_ranks_block_rows_stack_to_the_local_gram(subsample, world):
    """Every rank's accumulator, filled with its own blocks against every rank's (what ``ShardedLayout.pairwise``
    does with broadcasts), holds its rows of the local Gram; 7 ranks for 6 samples: one rank has none."""
    problem = CASES["cnn-bn-eval-ce"]()
    groups = [("all", tuple(problem.params)), ("head", ("8.weight", "8.bias"))]
    outputs = problem.forward().detach()
    columns = make_columns(problem, outputs, ColumnSpec(subsample=subsample))
    seeds = gradient_seeds(problem, outputs)
    N, K = problem.batch_size, columns.per_sample
    ranks = [ShardedLayout(Comm(None, r, world, problem.device, problem.device), N, shard_bounds(N, world))
             for r in range(world)]
    names = list(problem.params)

    def compute(block: ColumnBlock) -> dict[str, torch.Tensor]:
        rows = generic.per_sample_vjp(problem, names, block.samples, block.seeds)
        return {k: v.reshape(block.num_columns, -1) for k, v in rows.items()}

    every = [layout.blocks(columns, seeds, max_columns=5, rank=r) for r, layout in enumerate(ranks)]
    accs = []
    for r, layout in enumerate(ranks):
        acc = layout.accumulator(groups, columns, N)
        sets = acc.owner_sets(names)
        for own in every[r]:
            for blocks in every:
                for other in blocks:
                    fi, fj = compute(own), compute(other)
                    for owners, members in sets:
                        acc.add(owners, own, other, sum(fi[n] @ fj[n].T for n in members))
        accs.append(acc)
    ref = compute_gram(problem, groups, with_gradients=True, subsample=subsample, ghost=False, plan=BIG)[0]
    v_bounds = [c * K for c in ranks[0].curvature_bounds(columns)]
    assert v_bounds[-1] == columns.num_columns
    for i, group in enumerate(ref):
        stacked = {key: torch.cat([getattr(acc.groups[i], key) for acc in accs]) for key in ("vv", "vg", "gg")}
        scale = float(group.vv.abs().max())
        for key, value in stacked.items():
            torch.testing.assert_close(value, getattr(group, key), rtol=0, atol=1e-12 * scale)


def test_local_layout_is_the_single_process_engine():
    problem = CASES["mlp-tanh-ce"]()
    layout = make_layout(problem)
    assert isinstance(layout, LocalLayout) and (layout.rank, layout.world) == (0, 1)
    columns = make_columns(problem, spec=ColumnSpec(subsample=4))
    assert layout.curvature_range(columns) == (0, 4)
    assert layout.held_columns(columns, None) == 12 and layout.held_columns(columns, 6) == 18
    assert layout.common_plan(BIG) is BIG
    assert layout.loss_value(problem) == float(problem.loss_value())
    torch.testing.assert_close(layout.outputs(problem), problem.forward().detach())
    acc = layout.accumulator([("all", tuple(problem.params))], columns, 6)
    acc.groups[0].vv += 1
    grams = layout.assemble(acc, columns, [0], with_gg=False)
    assert grams[0].gg is None and grams[0].vv.sum() == 144 and acc.groups == []


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone: the sharded code path with one rank."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_sharded_path_on_one_process_matches_the_local_one(one_process_group):
    problem = CASES["cnn-bn-eval-ce"]()
    assert isinstance(make_layout(problem, one_process_group), ShardedLayout)
    kw = {"groups": "layer", "include_total": True, "top_k": 3, "max_memory": 60_000}  # several blocks a rank
    got = compute_spectrum(problem, process_group=one_process_group, **kw)
    ref = compute_spectrum(problem, **kw)
    for g, r in zip(got.groups, ref.groups, strict=True):
        assert (g.name, g.param_names, g.rank) == (r.name, r.param_names, r.rank)
        torch.testing.assert_close(g.eigenvalues, r.eigenvalues, rtol=1e-10, atol=1e-14 * ref.groups[0].lambda_max)
        torch.testing.assert_close(g.directions.lambdas, r.directions.lambdas, rtol=1e-7, atol=1e-12)
    groups = [("all", tuple(problem.params))]
    assert_same_grams(compute_gram(problem, groups, with_gradients=True)[0],
                      compute_gram(problem, groups, with_gradients=True, process_group=one_process_group)[0])
    vecs = eigenvectors(problem, got, 0, process_group=one_process_group)
    for n, v in eigenvectors(problem, got, 0).items():
        torch.testing.assert_close(vecs[n], v, rtol=1e-12, atol=1e-14)
    step = newton_step(problem, got, 1e-3, process_group=one_process_group)
    assert step.predicted_decrease == pytest.approx(newton_step(problem, got, 1e-3).predicted_decrease, rel=1e-10)
