"""compute_gram, the one Gram pass: every block (vv, vg, gg) of every group against the dense Jacobian, with
and without the ghost rules; a batch too large for the memory budget is split and gives the same Gram; the
materialized rows of V; the progress protocol."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DENSE_CASES
from helpers import assert_same_grams, dense_grams

from curvscope.curvature.gram import compute_gram, materialize_columns
from curvscope.curvature.gram.columns import ColumnSpec, make_columns
from curvscope.curvature.memory import MemoryPlan

BIG = MemoryPlan(budget=2**30)


def _all_groups(problem) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{mode}:{g.name}", g.param_names) for mode in ("all", "layer", "tensor")
            for g in problem.groups(mode)]


@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize("ghost", [True, False])
def test_gram_equals_dense(case, ghost):
    problem = CASES[case]()
    groups = _all_groups(problem)
    for subsample, mc in ((None, 0), (4, 0), (None, 2)):
        got, columns, outputs = compute_gram(problem, groups, with_gradients=True, subsample=subsample,
                                             mc_samples=mc, seed=1, ghost=ghost, plan=BIG)
        assert columns.num_samples == (subsample or problem.batch_size)
        assert columns.per_sample == (mc or problem.num_outputs)
        torch.testing.assert_close(outputs, problem.forward().detach())
        dense = dense_grams(problem, columns, groups)
        assert_same_grams(dense, got, floor=float(dense[0].vv.abs().max()))  # dense[0]: the whole model
    got, columns, _ = compute_gram(problem, groups, ghost=ghost, plan=BIG)  # V only
    assert got[0].vg is None and got[0].gg is None
    dense = dense_grams(problem, columns, groups, with_gradients=False)
    assert_same_grams(dense, got, floor=float(dense[0].vv.abs().max()))


def test_given_columns_are_used():
    problem = CASES["mlp-tanh-ce"]()
    columns = make_columns(problem, spec=ColumnSpec(mc_samples=3, subsample=5, seed=2))
    groups = [("all", tuple(problem.params))]
    got, same, _ = compute_gram(problem, groups, columns=columns, with_gradients=True, plan=BIG)
    assert same is columns
    assert_same_grams(dense_grams(problem, columns, groups), got)


# -- memory: a batch too large for the budget is split, and the result is the same ---------------------------

@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("use_ghost", [False, True])
@pytest.mark.parametrize("subsample", [None, 2])
def test_small_budget_splits_and_matches(use_ghost, subsample):
    """Tiny budgets: seeds of one sample split over blocks, blocks held a stripe at a time and recomputed,
    blocks computed once and kept; the Gram is the unchunked one."""
    problem = CASES["rule-conv1d"](n=3)
    groups = _all_groups(problem)
    ref = compute_gram(problem, groups, with_gradients=True, subsample=subsample, ghost=False, plan=BIG)[0]
    for budget in (10_000, 30_000):
        got = compute_gram(problem, groups, with_gradients=True, subsample=subsample, ghost=use_ghost,
                           plan=MemoryPlan(budget=budget))[0]
        assert_same_grams(ref, got)


def test_materialized_columns_give_the_gram():
    problem = CASES["rule-linear3d"]()
    rows = materialize_columns(problem, list(problem.params))
    V = torch.cat([r.reshape(r.shape[0], -1) for r in rows.values()], dim=1)
    ref = compute_gram(problem, [("all", tuple(problem.params))], plan=BIG)[0][0].vv
    torch.testing.assert_close(V @ V.T, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("ghost", [True, False])
def test_progress_counts_parameter_tensors(ghost):
    problem = CASES["cnn-bn-eval-ce"]()  # convolutions and a Linear (ghost rules), BatchNorm (generic path)
    calls = []
    compute_gram(problem, [("all", tuple(problem.params))], ghost=ghost, plan=BIG,
                 progress=lambda *a: calls.append(a))
    D = len(problem.params)
    assert calls[0] == ("gram", 0, D) and calls[-1] == ("gram", D, D)
    assert all(stage == "gram" and total == D for stage, _, total in calls)
    done = [d for _, d, _ in calls]
    assert done == sorted(done)
