"""Damped Newton steps along eigen-directions (CURVATURE.md section 5) against a dense brute force, float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvscope.curvature.newton import (
    bootstrap_damping,
    damping_grid,
    default_blocks,
    newton_coefficients,
    newton_step,
    parse_damping,
)
from curvscope.curvature.spectrum import compute_spectrum
from curvscope.errors import CurvscopeError
from curvscope.problem import make_problem

DT = torch.float64


def ce_problem(seed: int = 0, n: int = 6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    y = torch.arange(n) % 3
    return make_problem(model, x, y, loss="ce", device="cpu", dtype=DT)


def linear_mse_problem(seed: int = 0, n: int = 8):
    torch.manual_seed(seed)
    model = nn.Linear(5, 2).to(DT)
    x = torch.randn(n, 5, dtype=DT)
    y = torch.randn(n, 2, dtype=DT)
    return make_problem(model, x, y, loss="mse", device="cpu", dtype=DT)


def dense(problem):
    """Dense GGN (D x D) from jacrev and the autograd loss Hessian, the gradient (D,), and each parameter's
    slice of the flat vector."""
    names = list(problem.params)
    flat = torch.cat([problem.params[n].reshape(-1) for n in names])
    sizes = [problem.params[n].numel() for n in names]

    def unflatten(v):
        return {n: t.reshape(problem.params[n].shape) for n, t in zip(names, v.split(sizes), strict=True)}

    def f(v, x):
        return functional_call(problem.model, {**problem.buffers, **unflatten(v)}, (x.unsqueeze(0),))[0]

    def sample_loss(out, y):
        if problem.loss.name == "ce":
            return F.cross_entropy(out.unsqueeze(0), y.unsqueeze(0))
        return F.mse_loss(out, y)

    D = flat.numel()
    G = torch.zeros(D, D, dtype=DT)
    for x, y in zip(problem.inputs, problem.targets, strict=True):
        J = jacrev(f)(flat, x)  # (C, D)
        H = hessian(sample_loss)(f(flat, x), y)  # (C, C)
        G += J.T @ H @ J
    G /= problem.batch_size
    g = torch.func.grad(lambda v: sum(sample_loss(f(v, x), y) for x, y in
                                      zip(problem.inputs, problem.targets, strict=True)) / problem.batch_size)(flat)
    slices, start = {}, 0
    for n, s in zip(names, sizes, strict=True):
        slices[n] = slice(start, start + s)
        start += s
    return G, g, slices


def dense_step(G, g, rank, delta):
    """-sum_k gamma_k / (lambda_k + delta) e_k over the top-``rank`` eigenpairs of the dense G."""
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    gamma = evecs.T @ g
    return -(evecs @ (gamma / (evals + delta)))


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


def reference_bootstrap(gamma, lambdas, grid, B, seed, q=5.0):
    """A straightforward loop implementation of the rule in CURVATURE.md section 5."""
    gen = torch.Generator().manual_seed(seed)
    N, NV = gamma.shape[0], lambdas.shape[0]
    idx_g = torch.randint(N, (B, N), generator=gen).numpy()
    idx_l = idx_g if NV == N else torch.randint(NV, (B, NV), generator=gen).numpy()
    gamma, lambdas, grid = gamma.numpy(), lambdas.numpy(), grid.numpy()
    out = []
    for k in range(gamma.shape[1]):
        g_mean, l_mean = gamma[:, k].mean(), lambdas[:, k].mean()
        best, best_delta = -math.inf, math.inf
        for delta in grid:
            s = -g_mean / (l_mean + delta)
            R = [-s * gamma[idx_g[b], k].mean() - 0.5 * s**2 * lambdas[idx_l[b], k].mean() for b in range(B)]
            p = np.percentile(R, q)
            if p > best:
                best, best_delta = p, delta
        out.append(best_delta if best > 0 else math.inf)
    return np.array(out)


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
        with pytest.raises(CurvscopeError, match="--damping"):
            parse_damping(bad)


def test_newton_needs_directions():
    problem = ce_problem()
    result = compute_spectrum(problem, directional=False)
    with pytest.raises(CurvscopeError, match="--no-directions"):
        newton_step(problem, result, 1e-3)
