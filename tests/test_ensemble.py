"""Ensemble ground truth and correlations against a one-model-at-a-time brute force (float64, tiny MLPs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvscope.cli.common import as_flags
from curvscope.curvature.symmetry.chain import find_chain
from curvscope.curvature.symmetry.ensemble import InitDrawer, ensemble_factors, pearson
from curvscope.curvature.symmetry.groups import build_structure
from curvscope.errors import CurvscopeError
from curvscope.models import mlp
from curvscope.problem import make_problem

F64 = torch.float64


def problem_for(d0, d1, d2, n=40, seed=0, bias=False):
    torch.manual_seed(seed)
    model = mlp(d0, [d1], d2, activation="tanh", bias=bias)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d0, generator=gen, dtype=F64)
    teacher = torch.randn(d0, d2, generator=gen, dtype=F64)
    y = (x @ teacher).argmax(1)
    return make_problem(model, x, y, loss="ce", device="cpu", dtype="float64")


def structure_of(problem, symmetry="orthogonal"):
    return build_structure(find_chain(problem.model, problem.params), symmetry)


def test_correlations_match_brute_force():
    problem = problem_for(5, 4, 3, bias=True)
    M = 6
    res = ensemble_factors(problem, structure_of(problem), models=M, init="normal", seed=3, chunk=4)
    drawer = InitDrawer(problem, "normal", seed=3)
    per_model = {"Phi_1": [], "Phi_2": [], "Psi_1": []}
    for i in range(M):
        g = problem.gradient(drawer.draw(i))  # one model at a time, no vmap
        g1, g2 = g["1.weight"], g["3.weight"]
        per_model["Phi_1"].append((g1.T @ g1 / 4).numpy())
        per_model["Phi_2"].append((g2 @ g2.T / 4).numpy())
        per_model["Psi_1"].append((g1.T @ g2.T / 4).numpy())
    for name, mats in per_model.items():
        truth = np.mean(mats, axis=0)
        assert np.allclose(res.ground_truth.blocks()[name].numpy(), truth, rtol=1e-10, atol=1e-14)
        r = [np.corrcoef(m.ravel(), truth.ravel())[0, 1] for m in mats]
        assert np.allclose(res.correlation[name].numpy(), r, rtol=1e-10), name
        assert res.summary()[name]["mean"] == pytest.approx(np.mean(r), rel=1e-10)
        assert res.summary()[name]["std"] == pytest.approx(np.std(r, ddof=1), rel=1e-8)
    assert np.allclose(res.example.blocks()["Phi_1"].numpy(), per_model["Phi_1"][0])
    # a one-entry factor has no correlation
    assert torch.isnan(res.correlation["phi_b1"]).all() and res.summary()["phi_b1"]["mean"] is None
    losses = [float(problem.loss_value(drawer.draw(i))) for i in range(M)]
    assert np.allclose(res.losses.numpy(), losses)


def test_given_members_and_chunking_do_not_change_the_result():
    problem = problem_for(4, 3, 3)
    s = structure_of(problem, "permutation")
    drawer = InitDrawer(problem, "default", seed=1)
    members = [drawer.draw(i) for i in range(5)]
    a = ensemble_factors(problem, s, members=members, chunk=2)
    b = ensemble_factors(problem, s, models=5, init="default", seed=1, chunk=5)
    assert a.init == "given" and b.init == "default"
    for C, D in zip(a.ground_truth.matrices, b.ground_truth.matrices, strict=True):
        assert torch.allclose(C, D)
    for name in a.correlation:
        assert torch.allclose(a.correlation[name], b.correlation[name], equal_nan=True)


def test_init_distributions():
    problem = problem_for(50, 40, 3, bias=True)
    normal = InitDrawer(problem, "normal", seed=0)
    p = normal.draw(0)
    assert p["1.weight"].std().item() == pytest.approx(1 / np.sqrt(50), rel=0.1)
    assert p["3.weight"].std().item() == pytest.approx(1 / np.sqrt(40), rel=0.25)
    assert p["1.bias"].abs().max() == 0
    assert torch.equal(normal.draw(0)["1.weight"], p["1.weight"])  # reproducible per member
    assert not torch.equal(normal.draw(1)["1.weight"], p["1.weight"])
    default = InitDrawer(problem, "default", seed=0).draw(0)
    bound = 1 / np.sqrt(50)  # nn.Linear.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert default["1.bias"].abs().max() <= bound and default["1.bias"].abs().max() > 0
    assert default["1.weight"].abs().max() <= bound
    with pytest.raises(CurvscopeError, match="--init"), as_flags():  # the engine names the option, the CLI its flag
        InitDrawer(problem, "xavier")


def test_phi1_correlation_rises_with_width():
    means = []
    for width in (2, 48):
        problem = problem_for(8, width, 4, n=64)
        res = ensemble_factors(problem, structure_of(problem), models=24, init="normal", seed=0)
        means.append(res.summary()["Phi_1"]["mean"])
    assert means[1] > means[0] + 0.1, means
    assert 0 < means[0] < 1 and 0 < means[1] < 1


def test_pearson_and_errors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=gen, dtype=F64)
    y = torch.randn(7, generator=gen, dtype=F64)
    ref = [np.corrcoef(x[i].numpy(), y.numpy())[0, 1] for i in range(3)]
    assert np.allclose(pearson(x, y).numpy(), ref)
    assert torch.isnan(pearson(torch.ones(2, 4, dtype=F64), y[:4])).all()
    problem = problem_for(3, 2, 2)
    with pytest.raises(CurvscopeError, match="at least 2"):
        ensemble_factors(problem, structure_of(problem), models=1)
