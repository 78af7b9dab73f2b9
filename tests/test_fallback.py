"""Models vmap cannot trace: the engine falls back to plain autograd, says so (``problem.path``), and gets the
same numbers as the dense references (plain-autograd Jacobians, PyTorch's own loss) and as the fast path."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_any
from torch import nn

from curvscope import CurvscopeError, make_problem
from curvscope.curvature.gram.newton import newton_step
from curvscope.curvature.gram.spectrum import compute_spectrum, eigenvectors
from curvscope.curvature.lr import reduced_hessian, third_order_diagonal
from curvscope.curvature.symmetry import compute_factors

N, C = 5, 3


class Recurrent(nn.Module):
    """An RNN over (N, T, 3) inputs, its last output through a Linear."""

    def __init__(self, cell: type[nn.RNNBase], batch_first: bool = True, bidirectional: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 4, batch_first=batch_first, bidirectional=bidirectional)
        self.out = nn.Linear(8 if bidirectional else 4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.out((h if self.batch_first else h.transpose(0, 1))[:, -1])


class Branchy(nn.Module):
    """A Python branch on a tensor value and an ``.item()`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if h.sum() > 0:
            h = 2 * h
        return self.b(h) * (1.0 + 0.1 * float(x.abs().max().item()))


class Squeezer(nn.Module):
    """A forward that squeezes (breaks on a batch of one sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.a(x)).squeeze()  # (N,)
        return self.b(x) * gate[:, None]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, C))


def lstm() -> nn.Module:
    return Recurrent(nn.LSTM)


def gru_seq_first() -> nn.Module:
    return Recurrent(nn.GRU, batch_first=False)


def rnn_bidirectional() -> nn.Module:
    return Recurrent(nn.RNN, bidirectional=True)


def prelu() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, C))


MODELS = {
    "mlp": (mlp, (N, 4)),
    "lstm": (lstm, (N, 4, 3)),
    "gru-seq-first": (gru_seq_first, (N, 4, 3)),
    "rnn-bidirectional": (rnn_bidirectional, (N, 4, 3)),
    "prelu": (prelu, (N, 4)),
    "branch-item": (Branchy, (N, 4)),
    "squeeze": (Squeezer, (N, 4)),
}
FAILS_UNDER_VMAP = {"lstm", "gru-seq-first", "rnn-bidirectional", "prelu", "branch-item", "squeeze"}
"""In torch 2.13 vmap raises on these, or (PReLU) returns wrong per-sample gradients: the probe catches both."""


def build(name: str, use_vmap: bool = True):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(N) % C
    return make_problem(model, x, y, loss="ce", dtype=torch.float64, use_vmap=use_vmap), y


@pytest.mark.parametrize("name", [m for m in MODELS if m != "mlp"])
def test_models_vmap_cannot_trace_match_the_dense_reference(name):
    problem, y = build(name)
    dense = dense_any(problem, lambda out: nn.CrossEntropyLoss()(out, y))
    ref_evals, _ = dense.eigen()
    # the generic path is the one that needs vmap (the ghost rules backpropagate with plain autograd)
    result = compute_spectrum(problem, ghost=name not in FAILS_UNDER_VMAP)
    if name in FAILS_UNDER_VMAP:
        assert result.path.startswith("autograd (vmap failed: ") and problem.path == result.path
    g = result.groups[0]
    assert g.rank == ref_evals.numel()
    torch.testing.assert_close(g.eigenvalues, ref_evals, rtol=1e-6, atol=1e-12 * float(ref_evals[0]))
    k = min(5, g.rank)
    evals, gamma, lambdas = dense.directions(k)
    torch.testing.assert_close(g.directions.lambdas[:, :k], lambdas, rtol=1e-6, atol=1e-9 * float(evals[0]))
    torch.testing.assert_close(g.directions.gamma[:, :k].abs(), gamma.abs(), rtol=1e-6, atol=1e-10)
    # eigenvectors (one multiplication by V) are the dense ones up to sign
    e = eigenvectors(problem, result, k=k)
    flat = torch.cat([e[n].reshape(k, -1) for n in problem.params], dim=1)
    _, dense_e = dense.eigen()
    torch.testing.assert_close((flat @ dense_e[:, :k]).diagonal().abs(), torch.ones(k, dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_fallback_and_fast_paths_agree_on_an_mlp():
    fast, _ = build("mlp")
    slow, _ = build("mlp", use_vmap=False)
    a, b = compute_spectrum(fast, groups="layer", include_total=True), compute_spectrum(slow, groups="layer",
                                                                                        include_total=True)
    assert not a.path.startswith("autograd (") and b.path == "autograd (vmap disabled)"
    for ga, gb in zip(a.groups, b.groups, strict=True):
        torch.testing.assert_close(gb.eigenvalues, ga.eigenvalues, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(gb.directions.gamma.abs(), ga.directions.gamma.abs(), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(gb.directions.lambdas, ga.directions.lambdas, rtol=1e-8, atol=1e-12)
    # generic path only (no ghost rules), and Newton steps through apply_v
    c = compute_spectrum(slow, ghost=False)
    torch.testing.assert_close(c.groups[0].eigenvalues, a.groups[0].eigenvalues, rtol=1e-10, atol=1e-14)
    sa, sb = newton_step(fast, a, damping=1e-3), newton_step(slow, b, damping=1e-3)
    for n in fast.params:
        torch.testing.assert_close(sb.step[n], sa.step[n], rtol=1e-8, atol=1e-12)
    assert sb.predicted_decrease == pytest.approx(sa.predicted_decrease, rel=1e-8)
    # learning rates and factors
    groups = fast.groups("layer")
    direction = fast.gradient()
    for curvature in ("hessian", "ggn"):
        torch.testing.assert_close(reduced_hessian(slow, direction, groups, curvature),
                                   reduced_hessian(fast, direction, groups, curvature), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(third_order_diagonal(slow, direction, groups),
                               third_order_diagonal(fast, direction, groups), rtol=1e-10, atol=1e-14)


def test_factors_per_sample_gradients_without_vmap():
    torch.manual_seed(0)
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(N) % C
    model = mlp().eval()
    fast = make_problem(model, x, y, loss="ce", dtype=torch.float64)
    slow = make_problem(model, x, y, loss="ce", dtype=torch.float64, use_vmap=False)
    for source in ("per-sample", "ggn"):
        a = compute_factors(fast, symmetry="orthogonal", source=source)
        b = compute_factors(slow, symmetry="orthogonal", source=source)
        assert b.path == "autograd (vmap disabled)"
        for ma, mb in zip(a.factors.matrices, b.factors.matrices, strict=True):
            torch.testing.assert_close(mb, ma, rtol=1e-10, atol=1e-14)


def test_lstm_learning_rates_and_newton_step():
    problem, y = build("lstm")
    result = compute_spectrum(problem)
    step = newton_step(problem, result)  # bootstrap damping on the per-sample gamma/lambda
    assert step.num_directions == result.groups[0].top_k
    dense = dense_any(problem, lambda out: nn.CrossEntropyLoss()(out, y))
    groups = problem.groups("tensor")
    direction = problem.gradient()
    flat = torch.cat([direction[n].reshape(-1) for n in problem.params])
    torch.testing.assert_close(flat, dense.gn.mean(0), rtol=1e-8, atol=1e-12)
    masks = torch.cat([torch.eye(len(groups), dtype=torch.float64)[:, [i]].expand(-1, p.numel())
                       for i, p in enumerate(problem.params.values())], dim=1)
    U = masks * flat
    B = dense.factor @ U.T
    torch.testing.assert_close(reduced_hessian(problem, direction, groups, "ggn"), B.T @ B, rtol=1e-8, atol=1e-14)


class Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).detach()


def test_a_model_that_cannot_be_differentiated_is_a_clean_error():
    x = torch.randn(N, 4)
    problem = make_problem(Detached(), x, torch.arange(N) % C, loss="ce", dtype=torch.float64)
    with pytest.raises(CurvscopeError, match="cannot be differentiated with respect to its parameters"):
        compute_spectrum(problem)


def test_the_probe_uses_two_samples():
    problem, _ = build("squeeze")
    assert problem.output_shape == (C,) and problem.batch_size == N
