"""Damped Newton steps along eigen-directions (docs/conventions.md §5) against a dense brute force, float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import CASES
from helpers import dense_ggn, dense_step, param_slices, per_sample_gradients, reference_bootstrap

from curvscope.curvature.gram.newton import (
    bootstrap_damping,
    damping_grid,
    default_blocks,
    newton_coefficients,
    newton_step,
    parse_damping,
)
from curvscope.curvature.gram.spectrum import compute_spectrum
from curvscope.errors import CurvscopeError

DT = torch.float64


def ce_problem(seed: int = 0, n: int = 6):
    return CASES["small-mlp-ce"](seed=seed, n=n)


def linear_mse_problem(seed: int = 0, n: int = 8):
    return CASES["linear-mse"](seed=seed, n=n)


def dense(problem):
    """Dense GGN (D x D), the gradient (D,), and each parameter's slice of the flat vector (``helpers``)."""
    return dense_ggn(problem), per_sample_gradients(problem).mean(0), param_slices(problem.params)


def flat_step(problem, step):
    return torch.cat([step[n].reshape(-1) for n in problem.params])


@pytest.mark.parametrize("delta", [1e-3, 0.5])
def test_constant_damping_matches_dense_brute_force(delta):
    problem = ce_problem()
    result = compute_spectrum(problem)
    G, g, _ = dense(problem)
    ns = newton_step(problem, result, delta)
    expected = dense_step(G, g, result.groups[0].rank, delta)
    assert torch.allclose(flat_step(problem, ns.step), expected, rtol=1e-7, atol=1e-9)
    d = flat_step(problem, ns.step)
    assert ns.predicted_decrease == pytest.approx(float(-(g @ d + 0.5 * d @ G @ d)), rel=1e-8)
    assert ns.predicted_decrease_blocks == pytest.approx(ns.predicted_decrease, rel=1e-8)
    assert ns.step_norm == pytest.approx(float(d.norm()), rel=1e-10)
    with torch.no_grad():
        after = float(problem.loss_value({n: p + ns.step[n] for n, p in problem.params.items()}))
    assert ns.realized_decrease == pytest.approx(float(problem.loss_value()) - after, rel=1e-12)
    assert ns.damping == delta and ns.blocks == ["all"] and ns.num_skipped == 0


def test_block_diagonal_step_is_the_sum_of_dense_block_steps():
    problem = ce_problem(seed=1)
    result = compute_spectrum(problem, groups="layer", include_total=True)
    assert default_blocks(result) == [1, 2]
    G, g, slices = dense(problem)
    ns = newton_step(problem, result, 1e-2)
    assert ns.blocks == ["0", "2"]
    expected = torch.zeros_like(g)
    predicted_blocks = 0.0
    for spec in result.groups[1:]:
        idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in spec.param_names])
        part = dense_step(G[idx][:, idx], g[idx], spec.rank, 1e-2)
        expected[idx] = part
        predicted_blocks += float(-(g[idx] @ part + 0.5 * part @ G[idx][:, idx] @ part))
    d = flat_step(problem, ns.step)
    assert torch.allclose(d, expected, rtol=1e-7, atol=1e-9)
    assert ns.predicted_decrease_blocks == pytest.approx(predicted_blocks, rel=1e-8)
    assert ns.predicted_decrease == pytest.approx(float(-(g @ d + 0.5 * d @ G @ d)), rel=1e-8)


def test_linear_mse_predicted_equals_realized():
    """Linear model + MSE: the loss is exactly quadratic and the GGN is its Hessian."""
    problem = linear_mse_problem()
    result = compute_spectrum(problem)
    ns = newton_step(problem, result, 1e-12)
    assert ns.realized_decrease > 0
    assert ns.predicted_decrease == pytest.approx(ns.realized_decrease, rel=1e-9, abs=1e-14)
    # full rank and (almost) no damping: the step lands on the minimum
    after = {n: p + ns.step[n] for n, p in problem.params.items()}
    grad = problem.gradient(after)
    assert max(float(t.abs().max()) for t in grad.values()) < 1e-9


def test_subsampled_curvature_uses_the_subsampled_ggn():
    problem = ce_problem(n=8)
    result = compute_spectrum(problem, subsample=5)
    ns = newton_step(problem, result, 0.1)
    sub = problem.with_batch(problem.inputs[:5], problem.targets[:5])
    G, _, _ = dense(sub)
    _, g, _ = dense(problem)  # the gradient is the whole batch's
    assert torch.allclose(flat_step(problem, ns.step), dense_step(G, g, result.groups[0].rank, 0.1),
                          rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("nv", [40, 25])
def test_bootstrap_picks_by_the_5th_percentile(nv):
    gen = torch.Generator().manual_seed(3)
    N, K = 40, 6
    signal = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.0, -0.8], dtype=DT)  # some clear, some pure noise
    noise = torch.tensor([0.3, 0.5, 1.0, 2.0, 3.0, 0.4], dtype=DT)
    gamma = signal + noise * torch.randn(N, K, generator=gen, dtype=DT)
    lambdas = (torch.tensor([4.0, 2.0, 1.0, 0.5, 0.2, 3.0], dtype=DT)
               * torch.rand(nv, K, generator=gen, dtype=DT) * 2)
    grid = damping_grid(lambdas.mean(0))
    got = bootstrap_damping(gamma, lambdas, grid=grid, num_resamples=60, seed=7)
    expected = reference_bootstrap(gamma, lambdas, grid, 60, 7)
    assert np.isinf(expected).any() and np.isfinite(expected).any()  # the data exercise both outcomes
    np.testing.assert_array_equal(np.isinf(got.numpy()), np.isinf(expected))
    fin = np.isfinite(expected)
    np.testing.assert_allclose(got.numpy()[fin], expected[fin], rtol=1e-12)
    # seeded: the same seed gives the same choice
    assert torch.equal(got, bootstrap_damping(gamma, lambdas, grid=grid, num_resamples=60, seed=7))


def test_bootstrap_step_skips_noisy_directions():
    problem = ce_problem(n=10)
    result = compute_spectrum(problem)
    ns = newton_step(problem, result, "bootstrap", num_resamples=50)
    d = result.groups[0].directions
    deltas = bootstrap_damping(d.gamma, d.lambdas, num_resamples=50, seed=0)
    assert torch.equal(ns.deltas[0], deltas)
    s = newton_coefficients(d.gamma_mean, result.groups[0].eigenvalues[:result.groups[0].top_k], deltas)
    assert torch.equal(s == 0, torch.isinf(deltas))
    assert torch.allclose(ns.coefficients[0], s)
    assert ns.num_skipped == int(torch.isinf(deltas).sum())
    # every kept direction decreases the quadratic model
    kept = ~torch.isinf(deltas)
    lam = result.groups[0].eigenvalues[:result.groups[0].top_k]
    assert bool(((-(s * d.gamma_mean + 0.5 * s**2 * lam))[kept] > 0).all())


def test_damping_grid_and_parse():
    grid = damping_grid(torch.tensor([4.0, 1.0], dtype=DT))
    assert grid.numel() == 51 and grid[0] == pytest.approx(4e-8) and grid[-1] == pytest.approx(400.0)
    assert parse_damping("bootstrap") == "bootstrap" and parse_damping(" Bootstrap ") == "bootstrap"
    assert parse_damping("1e-3") == 1e-3 and parse_damping(0) == 0.0
    for bad in ("nonsense", "-1", "nan", "inf"):
        with pytest.raises(CurvscopeError, match="^damping"):
            parse_damping(bad)


def test_newton_needs_directions():
    problem = ce_problem()
    result = compute_spectrum(problem, directional=False)
    with pytest.raises(CurvscopeError, match="directional=True"):
        newton_step(problem, result, 1e-3)


def test_progress_counts_the_blocks():
    problem = ce_problem(seed=1)
    result = compute_spectrum(problem, groups="layer", include_total=True)
    calls = []
    newton_step(problem, result, 1e-2, progress=lambda *a: calls.append(a))
    assert calls == [("newton", 0, 2), ("newton", 1, 2), ("newton", 2, 2)]
