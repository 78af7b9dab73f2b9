"""loss_landscape (curvscope.curvature.landscape): direct loss evaluations and the quadratic model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import flat_params as flat
from helpers import unflatten_params as unflatten
from torch import nn

from curvscope.curvature.landscape import batch_loss, default_radius, loss_landscape
from curvscope.curvature.matfree import compute_matfree_spectrum
from curvscope.errors import CurvscopeError
from curvscope.problem import make_problem

F64 = torch.float64


def layernorm_gelu_ce():
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))
    return make_problem(model, torch.randn(10, 4), torch.randint(0, 3, (10,)), loss="ce", dtype=F64)



def loss_at(problem, theta) -> float:
    with torch.no_grad():
        return float(problem.loss_value(unflatten(problem, theta)))


def random_direction(problem, seed):
    return torch.randn(problem.num_params, generator=torch.Generator().manual_seed(seed), dtype=F64)


def dense_directional_curvature(problem, d):
    """``d^T H d`` from ``torch.autograd.functional.hessian`` (see test_operators.py for its own check)."""
    H = torch.autograd.functional.hessian(lambda th: problem.loss_value(unflatten(problem, th)), flat(problem))
    return float(d @ H @ d)


def test_one_dimensional_values_are_direct_loss_evaluations():
    problem = layernorm_gelu_ce()
    d = 3.0 * random_direction(problem, 0)  # not unit: scaled to unit norm inside
    land = loss_landscape(problem, d, radius=0.5, points=7, points_2d=0)
    unit = d / d.norm()
    torch.testing.assert_close(land.direction1, unit)
    theta = flat(problem)
    want = torch.tensor([loss_at(problem, theta + float(t) * unit) for t in land.t], dtype=F64)
    torch.testing.assert_close(land.t, torch.linspace(-0.5, 0.5, 7, dtype=F64))
    torch.testing.assert_close(land.loss_1d, want, rtol=1e-13, atol=0)
    assert land.loss_1d[3] == pytest.approx(float(problem.loss_value()), rel=1e-14)
    assert land.loss_2d is None and land.grid_s is None and land.direction2 is None


def test_dict_direction_and_chunks_give_the_same_landscape():
    problem = layernorm_gelu_ce()
    d = random_direction(problem, 1)
    as_dict = unflatten(problem, d)
    a = loss_landscape(problem, d, radius=0.3, points=5, points_2d=0)
    b = loss_landscape(problem, as_dict, radius=0.3, points=5, points_2d=0, chunk_size=3)
    torch.testing.assert_close(a.loss_1d, b.loss_1d, rtol=1e-13, atol=0)
    # a dict with missing names: those parameters stay fixed
    partial = loss_landscape(problem, {"3.weight": as_dict["3.weight"]}, radius=0.3, points=3, points_2d=0)
    moved = torch.cat([torch.zeros_like(p).reshape(-1) if n != "3.weight" else as_dict[n].reshape(-1)
                       for n, p in problem.params.items()])
    moved = moved / moved.norm()
    assert partial.loss_1d[0] == pytest.approx(loss_at(problem, flat(problem) - 0.3 * moved), rel=1e-13)


def test_quadratic_model_matches_to_third_order():
    problem = layernorm_gelu_ce()
    d = random_direction(problem, 2)
    unit = d / d.norm()
    curvature = dense_directional_curvature(problem, unit)
    errors = []
    for r in (4e-2, 2e-2, 1e-2):
        land = loss_landscape(problem, d, radius=r, points=5, points_2d=0)
        assert land.curvature == pytest.approx(curvature, rel=1e-10)
        errors.append(float((land.loss_1d - land.quadratic_1d).abs().max()))
    # halving the range divides an O(t^3) error by ~8 (an O(t^2) one only by 4)
    assert errors[0] / errors[1] > 6.5 and errors[1] / errors[2] > 6.5
    # the slope is the directional derivative g . d1
    theta = flat(problem).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.loss_value(unflatten(problem, theta)), theta)
    assert land.slope == pytest.approx(float(grad @ unit), rel=1e-12)
    # with a wrong curvature the model is only second-order accurate: the same check must fail
    wrong = [float((x.loss_1d - x.quadratic_1d).abs().max())
             for x in (loss_landscape(problem, d, radius=r, points=5, points_2d=0, eigenvalue=curvature + 0.5)
                       for r in (2e-2, 1e-2))]
    assert wrong[0] / wrong[1] < 4.5


def test_two_dimensional_grid_is_direct_loss_evaluations():
    problem = layernorm_gelu_ce()
    d1, d2 = random_direction(problem, 3), random_direction(problem, 4)
    land = loss_landscape(problem, (d1, d2), radius=0.4, points=5, points_2d=5)
    u1, u2 = land.direction1, land.direction2
    assert float(u1 @ u2) == pytest.approx(0.0, abs=1e-14)
    assert float(u2.norm()) == pytest.approx(1.0, rel=1e-14)
    assert land.loss_2d.shape == (5, 5) and land.grid_s.shape == land.grid_t.shape == (5,)
    theta = flat(problem)
    for i, s in enumerate(land.grid_s.tolist()):
        for j, t in enumerate(land.grid_t.tolist()):
            assert float(land.loss_2d[i, j]) == pytest.approx(loss_at(problem, theta + s * u1 + t * u2), rel=1e-13)
    torch.testing.assert_close(land.loss_2d[:, 2], land.loss_1d, rtol=1e-13, atol=0)  # the t = 0 line is d1's
    # a (2, D) tensor gives the same plane
    again = loss_landscape(problem, torch.stack([d1, d2]), radius=0.4, points=5, points_2d=5)
    torch.testing.assert_close(again.loss_2d, land.loss_2d)


def test_default_radius_from_the_eigenvalue_and_eigenvectors_as_directions():
    problem = layernorm_gelu_ce()
    res = compute_matfree_spectrum(problem, top_k=2, eigenvectors=True, trace_matvecs=0, density_vectors=0)
    lam = res.groups[0].lambda_max
    land = loss_landscape(problem, res.eigenvectors, eigenvalue=lam, points=5, points_2d=3)
    L0 = float(problem.loss_value())
    assert land.radius == pytest.approx(2 * math.sqrt(2 * max(L0, 1e-3) / lam), rel=1e-12)
    assert land.curvature == lam and land.loss_2d.shape == (3, 3)
    # the top eigenvector's curvature is the eigenvalue, so the default Hessian curvature agrees with it
    top_only = loss_landscape(problem, {n: v[:1] for n, v in res.eigenvectors.items()}, radius=0.1, points=3)
    assert top_only.curvature == pytest.approx(lam, rel=1e-6)
    assert loss_landscape(problem, random_direction(problem, 5), points=3, points_2d=0).radius == 1.0
    assert default_radius(0.0, 4.0) == pytest.approx(2 * math.sqrt(2e-3 / 4.0))
    assert default_radius(1.0, -2.0) == 1.0 and default_radius(1.0, None) == 1.0
    assert "tensor" not in repr(land)


def test_batch_loss_matches_the_problem_loss():
    problem = layernorm_gelu_ce()
    assert batch_loss(problem, problem.params, chunk_size=4) == pytest.approx(float(problem.loss_value()),
                                                                            rel=1e-14)


def test_direction_errors():
    problem = layernorm_gelu_ce()
    d = random_direction(problem, 6)
    with pytest.raises(CurvscopeError, match="parallel"):
        loss_landscape(problem, (d, 2 * d), points=3)
    with pytest.raises(CurvscopeError, match="nonzero"):
        loss_landscape(problem, torch.zeros_like(d), points=3)
    with pytest.raises(CurvscopeError, match="one or two"):
        loss_landscape(problem, [d, d, d], points=3)
    with pytest.raises(CurvscopeError, match="entries"):
        loss_landscape(problem, d[:5], points=3)
    with pytest.raises(CurvscopeError, match="unknown"):
        loss_landscape(problem, {"nope": torch.ones(2)}, points=3)
