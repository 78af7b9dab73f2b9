"""compute_matfree_spectrum (curvscope.curvature.matfree) against dense eigen-decompositions and the Gram engine."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import dense_ggn, group_index
from helpers import flat_params as flat
from helpers import unflatten_params as unflatten
from torch import nn

from curvscope.curvature.gram.spectrum import compute_spectrum
from curvscope.curvature.matfree import compute_matfree_spectrum, gaussian_density
from curvscope.errors import CurvscopeError
from curvscope.problem import make_problem

F64 = torch.float64


def layernorm_gelu_ce(n: int = 10):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(6))
        model[1].bias.add_(0.3 * torch.randn(6))
    return make_problem(model, torch.randn(n, 4), torch.randint(0, 3, (n,)), loss="ce", dtype=F64)


def tanh_mse():
    # one output: with C > 1 the last layer's MSE Hessian block is a Kronecker product with I_C, whose repeated
    # eigenvalues a single Lanczos run (curvature/matfree/eigen.py) reports with lower multiplicity
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    return make_problem(model, torch.randn(9, 3), torch.randn(9, 1), loss="mse", dtype=F64)



def dense_hessian(problem):
    """By ``torch.autograd.functional.hessian`` (checked against finite differences in test_operators.py)."""
    return torch.autograd.functional.hessian(lambda th: problem.loss_value(unflatten(problem, th)), flat(problem))


def close_rel(got, want, rtol):
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= rtol * scale, (got, want)


# -- eigenvalues ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [layernorm_gelu_ce, tanh_mse])
def test_hessian_top_and_bottom_match_dense(make):
    problem = make()
    H = dense_hessian(problem)
    evals = torch.linalg.eigvalsh(H)  # ascending
    k = 4
    res = compute_matfree_spectrum(problem, curvature="hessian", top_k=k, tol=1e-9, max_steps=problem.num_params,
                                   trace_matvecs=0, density_vectors=0)
    g = res.groups[0]
    assert g.converged and res.converged
    close_rel(g.top, evals.flip(0)[:k], 1e-6)
    close_rel(g.bottom, evals[:k], 1e-6)
    assert g.lambda_min == pytest.approx(float(evals[0]), rel=1e-6, abs=1e-9)
    assert g.lambda_min < 0 < g.lambda_max  # an indefinite Hessian: negative curvature is found
    assert float(g.top_residuals.max()) <= 1e-9 * float(evals.abs().max())
    assert g.stability_lr == pytest.approx(2.0 / float(evals[-1]), rel=1e-6)


def test_ggn_by_lanczos_equals_ggn_by_gram_per_group():
    problem = layernorm_gelu_ce()
    k = 5
    gram = compute_spectrum(problem, groups="layer", directional=False, include_total=True)
    res = compute_matfree_spectrum(problem, curvature="ggn", groups="layer", top_k=k, tol=1e-10, trace_matvecs=0,
                                   density_vectors=0)
    assert [g.name for g in res.groups] == [g.name for g in gram.groups]
    assert res.groups[0].name == "all" and res.groups[0].num_params == problem.num_params
    for mine, ref in zip(res.groups, gram.groups, strict=True):
        assert mine.param_names == ref.param_names
        want = torch.zeros(min(k, mine.num_params), dtype=F64)
        top = ref.eigenvalues[:k]
        want[:top.numel()] = top
        # the GGN's zero eigenvalues come out as tiny Ritz values: compare on the scale of the whole spectrum
        assert float((mine.top - want).abs().max()) <= 1e-6 * gram.groups[0].lambda_max
        assert mine.bottom is None and mine.lambda_min is None and mine.negative_mass is None
        assert mine.density_below_zero is None
        close_rel(mine.top[:1], ref.eigenvalues[:1], 1e-6)


def test_ggn_top_matches_dense_ggn_with_default_steps():
    problem = tanh_mse()
    evals = torch.linalg.eigvalsh(dense_ggn(problem)).flip(0)
    res = compute_matfree_spectrum(problem, curvature="ggn", top_k=3, trace_matvecs=0, density_vectors=0)
    close_rel(res.groups[0].top, evals[:3], 1e-6)
    assert res.groups[0].converged


def test_per_group_hessian_is_the_diagonal_block():
    problem = tanh_mse()
    H = dense_hessian(problem)
    res = compute_matfree_spectrum(problem, groups="tensor", include_total=False, top_k=2, tol=1e-9,
                                   trace_matvecs=10_000, density_vectors=0)
    assert [g.name for g in res.groups] == list(problem.params)
    for g in res.groups:
        idx = group_index(problem.params, g.param_names)
        block = H[idx][:, idx]
        evals = torch.linalg.eigvalsh(block)
        k = min(2, idx.numel())
        close_rel(g.top, evals.flip(0)[:k], 1e-6)
        close_rel(g.bottom, evals[:k], 1e-6)
        assert g.trace == pytest.approx(float(block.trace()), rel=1e-10, abs=1e-12)
        assert g.trace_method == "exact" and g.trace_stderr == 0.0


def test_eigenvectors_are_parameter_shaped_ritz_vectors():
    problem = layernorm_gelu_ce()
    H = dense_hessian(problem)
    res = compute_matfree_spectrum(problem, groups="layer", include_total=False, top_k=2, tol=1e-10,
                                   eigenvectors=True, trace_matvecs=0, density_vectors=0)
    vecs = res.eigenvectors
    first = res.groups[0]
    assert set(vecs) == set(problem.params)
    for n, p in problem.params.items():
        assert vecs[n].shape == (2, *p.shape)
        if n not in first.param_names:
            assert float(vecs[n].abs().max()) == 0.0
    V = torch.stack([torch.cat([vecs[n][i].reshape(-1) for n in problem.params]) for i in range(2)])
    torch.testing.assert_close(V @ V.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-10)
    for i in range(2):  # each is an eigenvector of the group's block of H
        idx = group_index(problem.params, first.param_names)
        q = V[i][idx]
        r = H[idx][:, idx] @ q - first.top[i] * q
        assert float(r.norm()) <= 1e-8 * float(first.top.abs().max())
    assert compute_matfree_spectrum(problem, top_k=1, trace_matvecs=0, density_vectors=0).eigenvectors is None


# -- trace ---------------------------------------------------------------------------------------------------

def test_trace_exact_when_budget_reaches_dim():
    problem = layernorm_gelu_ce()
    res = compute_matfree_spectrum(problem, top_k=1, trace_matvecs=problem.num_params, density_vectors=0)
    g = res.groups[0]
    assert g.trace_method == "exact" and g.trace_stderr == 0.0
    assert g.trace == pytest.approx(float(dense_hessian(problem).trace()), rel=1e-10)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hutchpp_trace_within_its_error(curvature):
    problem = layernorm_gelu_ce()
    A = dense_hessian(problem) if curvature == "hessian" else dense_ggn(problem)
    true = float(A.trace())
    errors = []
    for budget in (30, 45):  # stderr rests on budget/3 samples: too few make it unreliable
        res = compute_matfree_spectrum(problem, curvature=curvature, top_k=1, trace_matvecs=budget,
                                       density_vectors=0, seed=3)
        g = res.groups[0]
        assert g.trace_method == "hutch++" and g.trace_stderr > 0
        assert abs(g.trace - true) <= 4 * g.trace_stderr + 1e-10 * abs(true), (budget, g.trace, true, g.trace_stderr)
        errors.append(g.trace_stderr)
    assert errors[1] < errors[0]  # more products, smaller error


# -- density -------------------------------------------------------------------------------------------------

def test_slq_density_integrates_to_one_and_matches_dense_spectrum():
    problem = layernorm_gelu_ce()
    H = dense_hessian(problem)
    evals = torch.linalg.eigvalsh(H)
    D = problem.num_params
    res = compute_matfree_spectrum(problem, top_k=1, trace_matvecs=0, density_vectors=24, density_steps=D)
    dens = res.density
    assert dens is res.groups[0].density and dens.grid.shape == dens.values.shape
    assert float(torch.trapezoid(dens.values, dens.grid)) == pytest.approx(1.0, abs=1e-3)
    # first moment: tr(H) / D; second: tr(H^2) / D (SLQ is exact for these polynomials, up to the random vectors)
    assert dens.moment(1) == pytest.approx(float(evals.mean()), abs=4 * dens.moment_stderr(1))
    assert dens.moment(2) == pytest.approx(float((evals**2).mean()), abs=4 * dens.moment_stderr(2))
    # the smoothed density below 0, against the dense eigenvalues smoothed the same way, and its integral
    g = res.groups[0]
    ref = float((0.5 * torch.erfc(evals / (dens.sigma * math.sqrt(2)))).mean())
    assert 0 < g.density_below_zero < 1
    assert g.density_below_zero == pytest.approx(ref, abs=0.1)
    fine = torch.linspace(float(dens.nodes.min()) - 8 * dens.sigma, 0.0, 20001, dtype=F64)
    integral = float(torch.trapezoid(gaussian_density(fine, dens.nodes, dens.weights, dens.sigma), fine))
    assert g.density_below_zero == pytest.approx(integral, abs=2e-3)
    # the negative mass: the share of eigenvalues clearly below zero (under -sigma), near-zero ones left out
    clearly = float((evals < -dens.sigma).to(F64).mean())
    assert 0 < g.negative_mass < g.density_below_zero
    assert g.negative_mass == pytest.approx(clearly, abs=0.1)


def test_negative_mass_of_a_convex_problem_is_about_zero():
    torch.manual_seed(13)
    problem = make_problem(nn.Linear(5, 1), torch.randn(20, 5), torch.randn(20, 1), loss="mse", dtype=F64)
    evals = torch.linalg.eigvalsh(dense_hessian(problem))
    res = compute_matfree_spectrum(problem, top_k=2, trace_matvecs=0, density_vectors=4, density_steps=6)
    g = res.groups[0]
    assert float(evals[0]) > 0.1 and g.lambda_min == pytest.approx(float(evals[0]), rel=1e-6)
    assert g.negative_mass == 0 and 0 <= g.density_below_zero < 1e-3


def test_density_only_for_the_first_group():
    problem = tanh_mse()
    res = compute_matfree_spectrum(problem, groups="layer", top_k=1, trace_matvecs=0, density_vectors=2,
                                   density_steps=10)
    assert res.groups[0].name == "all" and res.groups[0].density is not None
    assert all(g.density is None and g.negative_mass is None and g.density_below_zero is None
               for g in res.groups[1:])


# -- bookkeeping, determinism, progress, errors --------------------------------------------------------------

def test_deterministic_in_seed():
    problem = layernorm_gelu_ce()
    kw = {"top_k": 2, "trace_matvecs": 15, "density_vectors": 2, "density_steps": 12, "max_steps": 20}
    a = compute_matfree_spectrum(problem, seed=5, **kw)
    b = compute_matfree_spectrum(problem, seed=5, **kw)
    c = compute_matfree_spectrum(problem, seed=6, **kw)
    ga, gb, gc = a.groups[0], b.groups[0], c.groups[0]
    assert torch.equal(ga.top, gb.top) and torch.equal(ga.bottom, gb.bottom)
    assert ga.trace == gb.trace and torch.equal(a.density.values, b.density.values)
    assert ga.trace != gc.trace
    assert not torch.equal(a.density.values, c.density.values)
    assert a.seed == 5 and c.seed == 6


def test_matvec_counts_and_result_fields():
    problem = tanh_mse()
    res = compute_matfree_spectrum(problem, groups="layer", top_k=2, trace_matvecs=9, density_vectors=2,
                                   density_steps=5)
    assert res.curvature == "hessian" and res.method == "lanczos" and res.grouping == "layer"
    assert res.loss_value == pytest.approx(float(problem.loss_value()), rel=1e-14)
    for i, g in enumerate(res.groups):
        density = 10 if i == 0 else 0
        assert g.matvecs >= g.steps + 9 + density
        assert g.top.shape == g.top_residuals.shape == g.bottom.shape == (2,)
    assert res.matvecs == sum(g.matvecs for g in res.groups)
    text = repr(res) + repr(res.groups[0])
    assert "tensor" not in text and "lambda_max=" in text and len(text) < 400
    assert res.group(res.groups[1].name) is res.groups[1]


def test_unconverged_when_steps_are_too_few():
    problem = layernorm_gelu_ce()
    res = compute_matfree_spectrum(problem, top_k=3, max_steps=6, tol=1e-12, trace_matvecs=0, density_vectors=0)
    assert not res.groups[0].converged and res.groups[0].steps == 6


def test_progress_stages():
    problem = tanh_mse()
    calls = []
    compute_matfree_spectrum(problem, groups="layer", top_k=2, trace_matvecs=6, density_vectors=2,
                             density_steps=5, progress=lambda s, d, t: calls.append((s, d, t)))
    assert {s for s, _, _ in calls} == {"lanczos", "trace", "density"}
    for stage in ("lanczos", "trace", "density"):
        mine = [(d, t) for s, d, t in calls if s == stage]
        done = [d for d, _ in mine]
        assert done == sorted(done) and all(d <= t for d, t in mine)
        assert mine[-1][0] == mine[-1][1]
        assert len({t for _, t in mine}) == 1


def test_argument_errors():
    problem = tanh_mse()
    with pytest.raises(CurvscopeError, match="curvature"):
        compute_matfree_spectrum(problem, curvature="fisher")
    with pytest.raises(CurvscopeError, match="groups"):
        compute_matfree_spectrum(problem, groups="blocks")
    with pytest.raises(CurvscopeError, match="top_k"):
        compute_matfree_spectrum(problem, top_k=0)
