"""The Gram engine's two paths agree: ghost rules (nn.Linear, nn.Conv1d/2d) vs the generic torch.func path,
for every block (vv, vg, gg) of every group; unsupported or unsafe layers fall back; memory chunking is
exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvscope
from curvscope.curvature import ghost
from curvscope.curvature.columns import gradient_seeds, make_columns
from curvscope.curvature.gram import GramAccumulator, compute_gram, materialize_columns
from curvscope.curvature.memory import ColumnBlock, MemoryPlan, column_blocks, pairwise

N, C = 6, 3
BIG = MemoryPlan(budget=2**30)


class SeqModel(nn.Module):
    """Linear layers on (N, 2, 3, d) inputs (several leading dims), mean-pooled."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5, bias=bias)
        self.out = nn.Linear(5, C, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x.reshape(x.shape[0], 2, 3, 4)))).mean(dim=(1, 2))


def _build(kind: str, bias: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "linear2d":
        return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, C, bias=bias)), \
            torch.randn(N, 5, generator=g)
    if kind == "linear3d":
        return SeqModel(bias), torch.randn(N, 24, generator=g)
    if kind == "conv1d":  # stride, padding, dilation; then 'same' with an even kernel (asymmetric padding)
        return nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, bias=bias), nn.Tanh(),
                             nn.Conv1d(3, 2, 4, padding="same", bias=bias), nn.Flatten(),
                             nn.Linear(10, C, bias=bias)), torch.randn(N, 2, 9, generator=g)
    if kind == "conv2d":
        return nn.Sequential(nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=bias),
                             nn.ReLU(), nn.Conv2d(3, 2, (2, 3), padding="same", bias=bias), nn.Tanh(),
                             nn.Conv2d(2, 2, 2, padding="valid", bias=bias), nn.Flatten(),
                             nn.Linear(2 * 3 * 4, C, bias=bias)), torch.randn(N, 2, 7, 5, generator=g)
    raise ValueError(kind)


def _problem(model: nn.Module, x: torch.Tensor, loss: str = "ce") -> curvscope.Problem:
    model.eval()
    y = torch.arange(N) % C if loss == "ce" else torch.rand(N, C, generator=torch.Generator().manual_seed(2))
    return curvscope.make_problem(model, x, y, loss=loss, dtype=torch.float64)


def _all_groups(problem) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{mode}:{g.name}", g.param_names) for mode in ("all", "layer", "tensor")
            for g in problem.groups(mode)]


def _generic(problem, groups, **kw):
    return compute_gram(problem, groups, with_gradients=True, ghost=False, plan=BIG, **kw)[0]


def _ghost(problem, groups, force_mode=None, plan=BIG, mc_samples=0, subsample=None, seed=0,
           with_gradients=True):
    """The ghost rules alone (then the generic path for what they leave), as compute_gram composes them."""
    columns = make_columns(problem, mc_samples=mc_samples, subsample=subsample, seed=seed)
    with torch.no_grad():
        grad_seeds = gradient_seeds(problem, problem.forward()) if with_gradients else None
    acc = GramAccumulator(groups, columns.num_columns, problem.batch_size if with_gradients else None,
                          problem.device)
    names = [n for n in problem.params if acc.wanted(n)]
    handled = ghost.contribute(problem, names, columns, grad_seeds, acc, plan, force_mode=force_mode)
    rest = [n for n in names if n not in handled]
    if rest:
        from curvscope.curvature.gram import _generic_contributions

        _generic_contributions(problem, rest, columns, grad_seeds, acc, plan, lambda _n: None)
    return acc.groups, handled


def _assert_same(ref, got, rtol: float = 1e-10) -> None:
    for a, b in zip(ref, got, strict=True):
        assert a.name == b.name
        scale = float(a.vv.abs().max()) + 1e-300
        for x, y in ((a.vv, b.vv), (a.vg, b.vg), (a.gg, b.gg)):
            if x is None:
                assert y is None
                continue
            torch.testing.assert_close(y, x, rtol=0, atol=rtol * max(scale, float(x.abs().max())))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kind", ["linear2d", "linear3d", "conv1d", "conv2d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("subsample", [None, 4])
def test_ghost_equals_generic(kind, bias, subsample):
    problem = _problem(*_build(kind, bias))
    groups = _all_groups(problem)
    ref = _generic(problem, groups, subsample=subsample)
    for mode in ("ghost", "materialize", None):
        got, handled = _ghost(problem, groups, force_mode=mode, subsample=subsample)
        assert handled == set(problem.params), (mode, handled)  # every tensor is a Linear/Conv parameter
        _assert_same(ref, got)
    # and through compute_gram's own composition
    _assert_same(ref, compute_gram(problem, groups, with_gradients=True, subsample=subsample, plan=BIG)[0])


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_ghost_equals_generic_mc_and_other_losses(loss):
    problem = _problem(*_build("conv2d", True), loss=loss)
    groups = _all_groups(problem)
    for mc in (0, 2):
        ref = _generic(problem, groups, mc_samples=mc, seed=3)
        got = compute_gram(problem, groups, with_gradients=True, mc_samples=mc, seed=3, plan=BIG)[0]
        _assert_same(ref, got)
        for mode in ("ghost", "materialize"):
            _assert_same(ref, _ghost(problem, groups, force_mode=mode, mc_samples=mc, seed=3)[0])
    ref = compute_gram(problem, groups, ghost=False, plan=BIG)[0]  # without gradient seeds: vv only
    got, _ = _ghost(problem, groups, force_mode="ghost", with_gradients=False)
    assert got[0].vg is None
    _assert_same(ref, got)


# -- layers the ghost rules must leave to the generic path --------------------------------------------------

class TwiceCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(x))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class UsedOutside(nn.Module):
    """The layer's weight also enters the output outside the layer's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)

    def forward(self, x):
        return self.lin(x) + x[:, :C] @ self.lin.weight[:, :C].T


class TimeMajor(nn.Module):
    """A Linear applied to a (T, N, d) layout: its first dimension is not the sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.head = nn.Linear(3, C)

    def forward(self, x):
        h = torch.tanh(self.lin(x.reshape(x.shape[0], 2, 2).transpose(0, 1)))  # (T=2, N, 3)
        return self.head(h.mean(0))


class ScaledOutput(nn.Module):
    """A forward hook rescales a Linear's output: the rule's delta would be w.r.t. the wrong tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)
        self.lin.register_forward_hook(lambda _m, _a, out: 2.0 * out)

    def forward(self, x):
        return self.lin(x)


FALLBACKS = {
    "twice-called": (TwiceCalled, {"head.weight", "head.bias"}),
    "tied": (Tied, {"head.weight", "head.bias"}),
    "used-outside": (UsedOutside, set()),
    "time-major": (TimeMajor, {"head.weight", "head.bias"}),
    "hooked-output": (ScaledOutput, set()),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_unsafe_layers_fall_back_to_the_generic_path(case):
    cls, expected = FALLBACKS[case]
    torch.manual_seed(0)
    problem = _problem(cls(), torch.randn(N, 4, generator=torch.Generator().manual_seed(1)))
    groups = _all_groups(problem)
    got, handled = _ghost(problem, groups)
    assert handled == expected
    _assert_same(_generic(problem, groups), got)


def test_unsupported_convolutions_are_not_candidates():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(),
                        nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(18, C))
    problem = _problem(net, torch.randn(N, 2, 5, 5, generator=torch.Generator().manual_seed(1)))
    groups = _all_groups(problem)
    got, handled = _ghost(problem, groups)
    assert handled == {"4.weight", "4.bias"}
    _assert_same(_generic(problem, groups), got)


def test_only_wanted_parameters_are_touched():
    problem = _problem(*_build("linear2d", True))
    groups = [("first", ("0.weight",))]
    got, handled = _ghost(problem, groups)
    assert handled == {"0.weight"}
    _assert_same(_generic(problem, groups), got)


def test_cost_rule_picks_ghost_for_wide_linear_and_materialize_for_many_positions():
    wide = ghost.GhostLayer("l", nn.Linear(64, 64), "l.weight", None, positions=1, d_in=64, d_out=64)
    conv = ghost.GhostLayer("c", nn.Conv2d(1, 16, 3), "c.weight", None, positions=64, d_in=9, d_out=16)
    assert ghost.choose_mode(wide, 128, 128 * 11, BIG, 4) == "ghost"
    assert ghost.choose_mode(conv, 128, 128 * 11, BIG, 4) == "materialize"
    # memory: materialized rows that cannot fit yield to ghost factors that can
    plan = MemoryPlan(budget=3 * 200 * 2**20)  # rows 369 MB, ghost factors 100 MB
    long = ghost.GhostLayer("s", nn.Linear(256, 256), "s.weight", None, positions=64, d_in=256, d_out=256)
    assert ghost.choose_mode(long, 128, 128 * 11, MemoryPlan(budget=2**40), 4) == "materialize"
    assert ghost.choose_mode(long, 128, 128 * 11, plan, 4) == "ghost"


# -- memory: a batch too large for the budget is split, and the result is the same ---------------------------

@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("use_ghost", [False, True])
@pytest.mark.parametrize("subsample", [None, 2])
def test_small_budget_splits_and_matches(use_ghost, subsample):
    """Tiny budgets: seeds of one sample split over blocks, blocks held a stripe at a time and recomputed,
    blocks computed once and kept; the Gram is the unchunked one."""
    problem = _problem(*_build("conv1d", True))
    problem = problem.with_batch(problem.inputs[:3], problem.targets[:3])
    groups = _all_groups(problem)
    ref = _generic(problem, groups, subsample=subsample)
    for budget in (10_000, 30_000):
        got = compute_gram(problem, groups, with_gradients=True, subsample=subsample, ghost=use_ghost,
                           plan=MemoryPlan(budget=budget))[0]
        _assert_same(ref, got)


def test_blocking_regimes_and_block_cover():
    plan = MemoryPlan(budget=3000)  # a third: 1000 bytes
    assert plan.blocking(10, 10, 10) == (10, 1)  # one block
    assert plan.blocking(10, 50, 200) == (2, 5)  # 5 blocks of 2 columns, all held: computed once
    assert plan.blocking(100, 50, 100) == (3, 3)  # 34 blocks, 3 held at a time: recomputed
    assert plan.blocking(100, 5000, 100) == (1, 1)  # never below one column
    problem = _problem(*_build("linear2d", True))
    out = problem.forward().detach()
    for subsample in (None, 4):
        columns = make_columns(problem, out, subsample=subsample)
        total = columns.num_columns + N
        for max_columns in (1, 2, 3, 5, 100):
            blocks = column_blocks(columns, gradient_seeds(problem, out), max_columns)
            index = torch.cat([b.index for b in blocks])
            assert sorted(index.tolist()) == list(range(total))
            assert all(b.num_columns <= max_columns for b in blocks)


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
    problem = _problem(*_build("linear2d", True))
    plan = MemoryPlan(budget=10)
    assert plan.sample_chunk(problem, list(problem.params), per_sample_rows=4, num_samples=N) == 1


def test_materialized_columns_give_the_gram():
    problem = _problem(*_build("linear3d", True))
    rows = materialize_columns(problem, list(problem.params))
    V = torch.cat([r.reshape(r.shape[0], -1) for r in rows.values()], dim=1)
    ref = compute_gram(problem, [("all", tuple(problem.params))], plan=BIG)[0][0].vv
    torch.testing.assert_close(V @ V.T, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
