"""Hessian- and GGN-vector products (curvscope.curvature.matfree.operators) against dense references.

The dense Hessian comes from ``torch.autograd.functional.hessian`` of the loss w.r.t. the flat parameter vector,
itself checked against central finite differences of the gradient; ``torch.func.hessian`` is never used as a
reference (wrong through LayerNorm + GELU in torch 2.14, docs/conventions.md §9). The dense GGN comes from the
autograd Jacobians of tests/helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import dense_ggn, ggn_factor, group_index, loss_hessians
from torch import nn

from curvscope.curvature.matfree import (
    curvature_operator,
    ggn_operator,
    hessian_operator,
    loss_hessian_product,
)
from curvscope.errors import CurvscopeError
from curvscope.problem import make_problem

F64 = torch.float64


# -- tiny problems -------------------------------------------------------------------------------------------

def tanh_ce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return make_problem(model, torch.randn(8, 4), torch.randint(0, 3, (8,)), loss="ce", dtype=F64)


def layernorm_gelu_ce():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))
    with torch.no_grad():  # move LayerNorm off its (1, 0) initialization so that its parameters matter fully
        model[1].weight.add_(0.3 * torch.randn(6))
        model[1].bias.add_(0.3 * torch.randn(6))
    return make_problem(model, torch.randn(8, 4), torch.randint(0, 3, (8,)), loss="ce", dtype=F64)


def sigmoid_mse():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 2))
    return make_problem(model, torch.randn(6, 3), torch.randn(6, 2), loss="mse", dtype=F64)


def tanh_bce():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    return make_problem(model, torch.randn(6, 3), torch.rand(6, 4), loss="bce", dtype=F64)


PROBLEMS = {"tanh-ce": tanh_ce, "layernorm-gelu-ce": layernorm_gelu_ce, "sigmoid-mse": sigmoid_mse,
            "tanh-bce": tanh_bce}


# -- dense references ----------------------------------------------------------------------------------------

def flat(problem) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in problem.params.values()])


def unflatten(problem, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, p in problem.params.items():
        out[n] = theta[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def dense_hessian(problem) -> torch.Tensor:
    """``d^2 L / d theta^2`` ``(D, D)`` by ``torch.autograd.functional.hessian``."""
    return torch.autograd.functional.hessian(lambda th: problem.loss_value(unflatten(problem, th)), flat(problem))


def gradient_at(problem, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.loss_value(unflatten(problem, theta)), theta)
    return g


def finite_difference_hessian(problem, h: float = 1e-5) -> torch.Tensor:
    """Central differences of the autograd gradient, column by column."""
    theta = flat(problem)
    cols = []
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        cols.append((gradient_at(problem, theta + e) - gradient_at(problem, theta - e)) / (2 * h))
    return torch.stack(cols, dim=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- the references themselves -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["layernorm-gelu-ce", "tanh-ce"])
def test_dense_hessian_reference_matches_finite_differences(name):
    problem = PROBLEMS[name]()
    H = dense_hessian(problem)
    assert rel(H, finite_difference_hessian(problem)) < 1e-7
    assert float((H - H.T).abs().max()) < 1e-12


def test_closed_form_loss_hessians_match_autograd():
    for name in ("ce", "mse", "bce"):
        problem = {"ce": tanh_ce, "mse": sigmoid_mse, "bce": tanh_bce}[name]()
        with torch.no_grad():
            out = problem.forward()
        H = loss_hessians(out, problem.targets, name)  # (N, C, C) by autograd
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
        got = loss_hessian_product(problem.loss, out, problem.targets)(w)
        torch.testing.assert_close(got, torch.einsum("ncd,nd->nc", H, w), rtol=1e-12, atol=1e-14)


def test_generic_loss_hessian_by_autograd_matches_closed_form():
    problem = tanh_ce()
    with torch.no_grad():
        out = problem.forward()

    class Custom:  # an unknown loss name: the product falls back to double backward on the outputs
        name = "custom"

        def __call__(self, outputs, targets):
            return torch.nn.functional.cross_entropy(outputs, targets)

    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    generic = loss_hessian_product(Custom(), out, problem.targets)(w)
    closed = loss_hessian_product(problem.loss, out, problem.targets)(w)
    torch.testing.assert_close(generic, closed, rtol=1e-12, atol=1e-14)


# -- Hessian-vector products ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PROBLEMS))
def test_hessian_operator_matches_dense_hessian(name):
    problem = PROBLEMS[name]()
    H = dense_hessian(problem)
    op = hessian_operator(problem)
    assert op.dim == problem.num_params and op.names == tuple(problem.params)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert rel(op.dense(), H) < 1e-10
    assert op.count == 1 + op.dim


def test_layernorm_gelu_hessian_against_finite_differences_directly():
    problem = layernorm_gelu_ce()
    op = hessian_operator(problem)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=F64)
    h, theta = 1e-5, flat(problem)
    fd = (gradient_at(problem, theta + h * v) - gradient_at(problem, theta - h * v)) / (2 * h)
    assert rel(op.matvec(v), fd) < 1e-7


@pytest.mark.parametrize("mode", ["layer", "tensor"])
def test_group_operators_are_diagonal_blocks(mode):
    problem = layernorm_gelu_ce()
    H, G = dense_hessian(problem), dense_ggn(problem)
    for group in problem.groups(mode):
        idx = group_index(problem.params, group.param_names)
        torch.testing.assert_close(hessian_operator(problem, group.param_names).dense(), H[idx][:, idx],
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ggn_operator(problem, group.param_names).dense(), G[idx][:, idx],
                                   rtol=1e-10, atol=1e-12)


def test_group_order_follows_names():
    problem = tanh_ce()
    names = ("2.bias", "0.weight")
    idx = group_index(problem.params, names)
    torch.testing.assert_close(hessian_operator(problem, names).dense(), dense_hessian(problem)[idx][:, idx],
                               rtol=1e-10, atol=1e-12)


# -- GGN-vector products -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PROBLEMS))
def test_ggn_operator_matches_dense_ggn(name):
    problem = PROBLEMS[name]()
    G = dense_ggn(problem)
    op = ggn_operator(problem)
    assert rel(op.dense(), G) < 1e-10
    V = ggn_factor(problem)  # G = V V^T
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(op.matvec(v), V @ (V.T @ v), rtol=1e-10, atol=1e-12)


def test_ggn_equals_hessian_for_a_linear_model_with_mse():
    torch.manual_seed(4)
    problem = make_problem(nn.Linear(3, 2), torch.randn(7, 3), torch.randn(7, 2), loss="mse", dtype=F64)
    torch.testing.assert_close(ggn_operator(problem).dense(), hessian_operator(problem).dense(),
                               rtol=1e-12, atol=1e-14)
    # ... and differs from it for a nonlinear model (the residual term is not zero)
    other = sigmoid_mse()
    assert rel(ggn_operator(other).dense(), dense_hessian(other)) > 1e-3


# -- frozen and unused parameters, modes, errors -------------------------------------------------------------

class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.unused = nn.Parameter(torch.randn(5))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.body(self.frozen(x))


def test_frozen_and_unused_parameters():
    torch.manual_seed(6)
    problem = make_problem(WithUnused(), torch.randn(6, 3), torch.randint(0, 3, (6,)), loss="ce", dtype=F64)
    assert "frozen.weight" not in problem.params and "unused" in problem.params
    H, G = dense_hessian(problem), dense_ggn(problem)
    assert rel(hessian_operator(problem).dense(), H) < 1e-10
    assert rel(ggn_operator(problem).dense(), G) < 1e-10
    u = group_index(problem.params, ["unused"])
    assert float(H[u].abs().max()) == 0.0
    for kind in ("hessian", "ggn"):  # a group no loss depends on: the zero operator, no error
        op = curvature_operator(problem, ["unused"], kind)
        assert op.dim == 5
        assert float(op.matvec(torch.ones(5, dtype=F64)).abs().max()) == 0.0


def test_operators_work_under_no_grad_and_with_float32_input():
    problem = tanh_ce()
    H = dense_hessian(problem)
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        op = hessian_operator(problem)
        hv = op.matvec(v.float())
    assert hv.dtype == F64 and not hv.requires_grad
    torch.testing.assert_close(hv, H @ v.float().double(), rtol=1e-10, atol=1e-12)


def test_repeated_products_reuse_the_graph_and_stay_exact():
    problem = layernorm_gelu_ce()
    op = hessian_operator(problem)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(8), dtype=F64)
    first = op.matvec(v)
    for _ in range(3):
        op.matvec(torch.randn(op.dim, dtype=F64))
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    assert op.count == 5
    assert "count=5" in repr(op) and "tensor" not in repr(op)


def test_operator_errors():
    problem = tanh_ce()
    with pytest.raises(CurvscopeError, match="unknown parameter"):
        hessian_operator(problem, ["nope"])
    with pytest.raises(CurvscopeError, match="unknown curvature"):
        curvature_operator(problem, None, "fisher")
    with pytest.raises(CurvscopeError, match="entries"):
        ggn_operator(problem).matvec(torch.zeros(3, dtype=F64))


def test_unflatten_and_flatten_roundtrip():
    problem = tanh_ce()
    op = ggn_operator(problem, ["2.weight", "0.bias"])
    v = torch.arange(op.dim, dtype=F64)
    parts = op.unflatten(v)
    assert parts["2.weight"].shape == (3, 6) and parts["0.bias"].shape == (6,)
    torch.testing.assert_close(op.flatten(parts), v)
    assert op.unflatten(torch.stack([v, v]))["2.weight"].shape == (2, 3, 6)


def test_transformer_with_attention_layernorm_gelu():
    from curvscope.models import transformer

    torch.manual_seed(9)
    model = transformer(seq_len=3, token_dim=2, dim=4, heads=2, depth=1, num_classes=3)
    problem = make_problem(model, torch.randn(5, 3, 2), torch.randint(0, 3, (5,)), loss="ce", dtype=F64)
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(4), dtype=F64)
    h, theta = 1e-5, flat(problem)
    fd = (gradient_at(problem, theta + h * v) - gradient_at(problem, theta - h * v)) / (2 * h)
    assert rel(hessian_operator(problem).matvec(v), fd) < 1e-6
    G = dense_ggn(problem)
    op = ggn_operator(problem)
    for seed in range(3):
        w = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
        torch.testing.assert_close(op.matvec(w), G @ w, rtol=1e-10, atol=1e-12)
