"""Matrix-free estimators (curvscope.curvature.matfree) against dense references with known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from curvscope.curvature.matfree import (
    extreme_eigenpairs,
    hutchinson,
    hutchpp,
    lanczos,
    spectral_density,
)
from curvscope.errors import CurvscopeError

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(evals, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric ``U diag(evals) U^T`` with a random orthogonal U; returns (A, U) (eigenvectors = columns)."""
    evals = torch.as_tensor(evals, dtype=F64)
    n = evals.numel()
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    return u @ torch.diag(evals) @ u.T, u


def indefinite(n: int = 200, seed: int = 0):
    """Separated extremes 20 and -8, clusters (15, 14.9, 14.8) and (-5, -4.95), a bulk in [-1, 3]."""
    extremes = [20.0, 15.0, 14.9, 14.8, -8.0, -5.0, -4.95]
    bulk = torch.rand(n - len(extremes), generator=gen(seed + 100), dtype=F64) * 4 - 1
    evals = torch.cat([torch.tensor(extremes, dtype=F64), bulk])
    a, u = with_spectrum(evals, seed)
    return a, u, evals


def recorder():
    """A list and a ``progress(stage, done, total)`` callback that appends ``(done, total)`` to it."""
    calls: list[tuple[int, int]] = []
    return calls, lambda _stage, done, total: calls.append((done, total))


class Counting:
    """``v -> A v`` that counts its calls and checks what it is given."""

    def __init__(self, a: torch.Tensor, dtype=F64):
        self.a, self.dtype, self.calls = a.to(dtype), dtype, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        assert v.shape == (self.a.shape[0],) and v.dtype == self.dtype and v.device.type == "cpu"
        self.calls += 1
        return self.a @ v


# -- Lanczos ---------------------------------------------------------------------------------------------

def test_lanczos_orthonormal_basis_tridiagonalizes():
    a, _, _ = indefinite(80)
    op = Counting(a)
    run = lanczos(op, 80, 30, generator=gen(1))
    q, t = run.Q, run.tridiagonal()
    assert run.alphas.shape == (30,) and run.betas.shape == (29,) and q.shape == (30, 80)
    assert run.matvecs == op.calls == 30 and not run.invariant
    assert torch.allclose(q @ q.T, torch.eye(30, dtype=F64), atol=1e-12)
    assert torch.allclose(q @ a @ q.T, t, atol=1e-10)
    # A Q^T - Q^T T is zero but for its last column, of norm beta_next
    resid = a @ q.T - q.T @ t
    assert resid[:, :-1].abs().max() < 1e-10
    assert resid[:, -1].norm() == pytest.approx(run.beta_next, rel=1e-8) and run.beta_next > 1e-3


def test_lanczos_stays_orthonormal_on_a_wide_spectrum():
    """Once-through Gram-Schmidt loses orthogonality here (~1e-9); twice is enough (~1e-15)."""
    a, _ = with_spectrum(torch.logspace(0, 10, 150, dtype=F64))
    run = lanczos(lambda v: a @ v, 150, 80, generator=gen(0))
    assert (run.Q @ run.Q.T - torch.eye(80, dtype=F64)).abs().max() < 1e-13


def test_lanczos_exact_with_steps_equal_dim():
    a, _ = with_spectrum([3.0, -2.0, 0.5, 0.49, 7.0, -7.5, 1.0, 0.0, 2.0, -0.1])
    run = lanczos(lambda v: a @ v, 10, 25, generator=gen(0))  # steps clipped to dim
    assert run.steps == 10 and run.invariant
    theta, _ = run.ritz()
    assert torch.allclose(theta, torch.linalg.eigvalsh(a), atol=1e-12)


def test_lanczos_stops_on_invariant_subspace():
    a, _ = with_spectrum([4.0] * 10 + [1.0] * 20 + [-3.0] * 10)
    op = Counting(a)
    run = lanczos(op, 40, 20, generator=gen(0))
    assert run.steps == 3 and run.invariant and op.calls == 3
    assert run.beta_next < 1e-10
    assert torch.allclose(run.ritz()[0], torch.tensor([-3.0, 1.0, 4.0], dtype=F64), atol=1e-12)


def test_lanczos_options():
    a, _, _ = indefinite(60)
    start = torch.randn(60, generator=gen(3), dtype=F64)
    full = lanczos(lambda v: a @ v, 60, 12, start=start)
    light = lanczos(lambda v: a @ v, 60, 12, start=start * 5, keep_basis=False)
    assert light.Q is None and torch.allclose(light.alphas, full.alphas, rtol=0, atol=1e-13)
    plain = lanczos(lambda v: a @ v, 60, 5, start=start, reorthogonalize=False, keep_basis=False)
    assert torch.allclose(plain.alphas, full.alphas[:5], atol=1e-10)
    assert torch.allclose(plain.betas, full.betas[:4], atol=1e-10)
    assert torch.allclose(full.Q[0], start / start.norm(), atol=1e-15)


def test_gauss_quadrature_is_exact_to_degree_2m_minus_1():
    a, _, _ = indefinite(50)
    a = a / 20
    v = torch.randn(50, generator=gen(5), dtype=F64)
    v = v / v.norm()
    m = 6
    theta, y = lanczos(lambda x: a @ x, 50, m, start=v).ritz()
    tau = y[0] ** 2
    for p in range(2 * m + 1):
        quad = float((tau * theta**p).sum())
        exact = float(v @ torch.linalg.matrix_power(a, p) @ v)
        if p <= 2 * m - 1:
            assert quad == pytest.approx(exact, rel=1e-9, abs=1e-14), p
        else:
            assert abs(quad - exact) > 1e-9 * abs(exact), "degree 2m should not be integrated exactly"


# -- extreme eigenpairs ----------------------------------------------------------------------------------

def test_extreme_eigenpairs_known_spectrum():
    a, u, evals = indefinite(200)
    op = Counting(a)
    tol = 1e-8
    res = extreme_eigenpairs(op, 200, 3, tol=tol, want_vectors=True, generator=gen(2))
    assert res.converged and res.steps < 200 and res.matvecs == op.calls
    assert res.matvecs == res.steps + 6  # the residual estimates are right: a single explicit check
    assert torch.allclose(res.top, torch.tensor([20.0, 15.0, 14.9], dtype=F64), rtol=1e-6, atol=0)
    assert torch.allclose(res.bottom, torch.tensor([-8.0, -5.0, -4.95], dtype=F64), rtol=1e-6, atol=0)
    assert res.norm_estimate == pytest.approx(20.0, rel=1e-9)
    for values, residuals, vectors in ((res.top, res.top_residuals, res.top_vectors),
                                       (res.bottom, res.bottom_residuals, res.bottom_vectors)):
        assert vectors.shape == (3, 200)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(3, dtype=F64), atol=1e-12)
        explicit = (vectors @ a - values[:, None] * vectors).norm(dim=1)
        assert torch.allclose(residuals, explicit, rtol=1e-6, atol=1e-13)
        assert bool((residuals <= tol * res.norm_estimate).all())
    # the well-separated extremes: eigenvector agreement
    assert abs(float(res.top_vectors[0] @ u[:, 0])) == pytest.approx(1.0, abs=1e-10)
    assert abs(float(res.bottom_vectors[0] @ u[:, 4])) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-8), (torch.float32, 1e-4)])
def test_paige_bounds_instead_of_explicit_residuals_cost_no_product(dtype, tol):
    """explicit=False: the run stops on the bounds beta |y_m| and reports them; under full reorthogonalization they
    are the true residuals (checked here against A v - theta v), and every product is a Lanczos step."""
    a, u, _ = indefinite(200)
    op = Counting(a, dtype=dtype)
    res = extreme_eigenpairs(op, 200, 1, which="largest", tol=tol, want_vectors=True, generator=gen(2), dtype=dtype,
                             explicit=False)
    assert res.converged and res.matvecs == res.steps == op.calls
    explicit = extreme_eigenpairs(Counting(a, dtype=dtype), 200, 1, which="largest", tol=tol, generator=gen(2),
                                  dtype=dtype)
    assert explicit.matvecs > explicit.steps >= res.steps  # the explicit check costs products, and steps
    v = res.top_vectors[0].to(F64)
    true = float((a @ v - float(res.top[0]) * v).norm())
    floor = 20.0 * torch.finfo(dtype).eps * 200
    assert float(res.top_residuals[0]) == pytest.approx(true, rel=1e-3, abs=floor)
    assert float(res.top_residuals[0]) <= tol * res.norm_estimate
    assert float(res.top[0]) == pytest.approx(20.0, rel=tol)
    assert abs(float(v @ u[:, 0])) == pytest.approx(1.0, abs=100 * tol)


def test_extreme_eigenpairs_one_end():
    a, _, _ = indefinite(120, seed=1)
    top = extreme_eigenpairs(lambda v: a @ v, 120, 2, which="largest", want_vectors=True)
    bottom = extreme_eigenpairs(lambda v: a @ v, 120, 2, which="smallest")
    assert top.bottom.numel() == 0 and top.bottom_residuals.numel() == 0 and top.bottom_vectors.shape == (0, 120)
    assert bottom.top.numel() == 0 and bottom.top_vectors is None
    assert torch.allclose(top.top, torch.tensor([20.0, 15.0], dtype=F64), rtol=1e-6)
    assert torch.allclose(bottom.bottom, torch.tensor([-8.0, -5.0], dtype=F64), rtol=1e-6)
    assert top.converged and bottom.converged


def test_extreme_eigenpairs_clips_k_and_is_exact_on_tiny():
    a, _ = with_spectrum([2.0, -1.0, 0.3, 5.0, -4.0], seed=4)
    res = extreme_eigenpairs(lambda v: a @ v, 5, 10, tol=1e-10)
    exact = torch.linalg.eigvalsh(a)
    assert res.top.shape == (5,) and res.bottom.shape == (5,)
    assert torch.allclose(res.top, exact.flip(0), atol=1e-12)
    assert torch.allclose(res.bottom, exact, atol=1e-12)
    assert res.converged and res.steps == 5


def test_extreme_eigenpairs_repeated_eigenvalues_through_restarts():
    evals = [5.0, 5.0, 5.0, 3.0, 1.0, 1.0, 0.0, -2.0, -2.0, -2.0, -2.0, 4.0]
    a, _ = with_spectrum(evals, seed=6)
    res = extreme_eigenpairs(lambda v: a @ v, 12, 3)
    assert torch.allclose(res.top, torch.full((3,), 5.0, dtype=F64), atol=1e-10)
    assert torch.allclose(res.bottom, torch.full((3,), -2.0, dtype=F64), atol=1e-10)
    assert res.converged


def test_extreme_eigenpairs_low_rank_psd():
    b = torch.randn(100, 4, generator=gen(7), dtype=F64)
    a = b @ b.T
    exact = torch.linalg.eigvalsh(a)
    top = extreme_eigenpairs(lambda v: a @ v, 100, 3, which="largest")
    assert torch.allclose(top.top, exact[-3:].flip(0), rtol=1e-10) and top.converged and top.steps < 10
    bottom = extreme_eigenpairs(lambda v: a @ v, 100, 3, which="smallest")
    assert bottom.bottom.abs().max() < 1e-10 and bottom.converged


def test_extreme_eigenpairs_reports_unconverged_with_true_residuals():
    a, _, _ = indefinite(200)
    res = extreme_eigenpairs(lambda v: a @ v, 200, 3, tol=1e-12, max_steps=8, want_vectors=True)
    assert not res.converged and res.steps == 8
    explicit = (res.top_vectors @ a - res.top[:, None] * res.top_vectors).norm(dim=1)
    assert torch.allclose(res.top_residuals, explicit, rtol=1e-6)
    assert float(res.top_residuals.max()) > 1e-12 * res.norm_estimate


def test_extreme_eigenpairs_progress_and_float32():
    a, _, _ = indefinite(100)
    calls = []
    op = Counting(a, dtype=torch.float32)
    res = extreme_eigenpairs(op, 100, 1, tol=1e-4, dtype=torch.float32, progress=lambda _s, d, t: calls.append((d, t)))
    assert res.top.dtype == torch.float32 and res.converged
    assert float(res.top[0]) == pytest.approx(20.0, rel=1e-4)
    assert float(res.bottom[0]) == pytest.approx(-8.0, rel=1e-4)
    assert [d for d, _ in calls] == list(range(1, res.steps + 1))
    assert {t for _, t in calls} == {80}


def test_matvec_of_a_function_hessian_by_double_backward():
    """A Hessian-vector product of a nonquadratic function (not a matrix), vs. the dense autograd Hessian."""
    dim = 30
    w = torch.randn(dim, dim, generator=gen(8), dtype=F64) / math.sqrt(dim)

    def f(x):
        return torch.sin(x).dot(w @ x) + 0.1 * (x**4).sum() - torch.logsumexp(w @ x, 0)

    x0 = torch.randn(dim, generator=gen(9), dtype=F64).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x0), x0, create_graph=True)

    def hvp(v):
        assert v.dtype == F64 and v.shape == (dim,)
        (hv,) = torch.autograd.grad(grad, x0, grad_outputs=v, retain_graph=True)
        return hv

    dense = torch.autograd.functional.hessian(f, x0.detach())
    exact = torch.linalg.eigvalsh(dense)
    assert exact[0] < 0 < exact[-1]  # indefinite
    res = extreme_eigenpairs(hvp, dim, 2, tol=1e-9)
    assert res.converged
    assert torch.allclose(res.top, exact[-2:].flip(0), rtol=1e-8, atol=1e-10)
    assert torch.allclose(res.bottom, exact[:2], rtol=1e-8, atol=1e-10)
    assert hutchpp(hvp, dim, dim).trace == pytest.approx(float(dense.trace()), rel=1e-12)
    est = hutchpp(hvp, dim, 24, generator=gen(0))
    assert abs(est.trace - float(dense.trace())) < 5 * est.stderr + 1e-9
    density = spectral_density(hvp, dim, num_vectors=4, steps=dim)
    assert float(torch.trapezoid(density.values, density.grid)) == pytest.approx(1.0, abs=1e-3)
    # a full Krylov space per vector: the nodes are the eigenvalues, the weights v's squared projections
    assert torch.allclose(density.nodes, exact.expand(4, dim), atol=1e-9)
    assert torch.allclose(density.weights.sum(1), torch.ones(4, dtype=F64), atol=1e-12)


# -- trace -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", [hutchpp, hutchinson])
def test_trace_exact_when_budget_covers_dim(estimator):
    a, _, _ = indefinite(40)
    op = Counting(a)
    est = estimator(op, 40, 55)
    assert est.method == "exact" and est.exact and est.stderr == 0.0
    assert est.matvecs == op.calls == 40
    assert est.trace == pytest.approx(float(a.trace()), rel=1e-12)


def test_hutchpp_uses_exactly_its_budget():
    a, _, _ = indefinite(60)
    for budget in (2, 3, 10, 31):
        op = Counting(a)
        calls, record = recorder()
        est = hutchpp(op, 60, budget, progress=record)
        assert est.matvecs == op.calls == budget
        assert calls == [(i, budget) for i in range(1, budget + 1)]
        assert est.method == ("hutchinson" if budget < 3 else "hutch++")
        assert math.isnan(est.stderr) == (budget == 3)


def test_hutchpp_exact_on_low_rank():
    """The sketch of m // 3 vectors captures a range of rank <= m // 3: no Hutchinson error is left."""
    b = torch.randn(90, 5, generator=gen(10), dtype=F64)
    a = b @ torch.diag(torch.tensor([4.0, -3.0, 2.0, 1.0, -0.5], dtype=F64)) @ b.T
    est = hutchpp(lambda v: a @ v, 90, 17, generator=gen(1))
    assert est.trace == pytest.approx(float(a.trace()), rel=1e-10) and est.stderr < 1e-9
    rough = hutchpp(lambda v: a @ v, 90, 14, generator=gen(1))  # sketch of 4 < rank 5
    assert abs(rough.trace - float(a.trace())) > 1e-6 and rough.stderr > 1e-6


def test_hutchpp_unbiased_within_its_stderr():
    a, _, _ = indefinite(100)
    truth = float(a.trace())
    runs = [hutchpp(lambda v: a @ v, 100, 30, generator=gen(s)) for s in range(40)]
    estimates = torch.tensor([r.trace for r in runs])
    stderrs = torch.tensor([r.stderr for r in runs])
    stderr_of_mean = float(stderrs.pow(2).mean().sqrt()) / math.sqrt(len(runs))
    assert abs(float(estimates.mean()) - truth) < 3 * stderr_of_mean
    # the reported stderr describes the spread over seeds
    spread = float(estimates.std())
    rms_stderr = float(stderrs.pow(2).mean().sqrt())
    assert 0.5 < spread / rms_stderr < 2.0
    coverage = float(((estimates - truth).abs() <= 3 * stderrs).double().mean())
    assert coverage >= 0.85


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    n = 150
    decay = 100.0 / torch.arange(1, n + 1, dtype=F64) ** 2  # low rank plus a small tail
    noise = 0.01 * torch.randn(n, generator=gen(11), dtype=F64)
    a, _ = with_spectrum(decay + noise, seed=12)
    truth = float(a.trace())
    errors_pp, errors_h = [], []
    for s in range(20):
        errors_pp.append(abs(hutchpp(lambda v: a @ v, n, 30, generator=gen(s)).trace - truth))
        errors_h.append(abs(hutchinson(lambda v: a @ v, n, 30, generator=gen(s)).trace - truth))
    assert sum(errors_pp) * 2 < sum(errors_h)


def test_hutchinson_stderr_and_mean():
    a, _, _ = indefinite(80)
    est = hutchinson(lambda v: a @ v, 80, 40, generator=gen(3))
    assert est.method == "hutchinson" and est.matvecs == 40 and est.stderr > 0
    assert abs(est.trace - float(a.trace())) < 4 * est.stderr
    assert math.isnan(hutchinson(lambda v: a @ v, 80, 1).stderr)


# -- spectral density ------------------------------------------------------------------------------------

def test_density_integrates_to_one_and_places_mass():
    evals = torch.cat([torch.full((30,), -5.0, dtype=F64), torch.full((70,), 5.0, dtype=F64)])
    evals = evals + 0.2 * torch.randn(100, generator=gen(13), dtype=F64)
    a, _ = with_spectrum(evals, seed=14)
    op = Counting(a)
    calls = []
    d = spectral_density(op, 100, num_vectors=16, steps=30, progress=lambda _s, done, tot: calls.append((done, tot)))
    assert d.grid.shape == d.values.shape == (400,) and d.nodes.shape == d.weights.shape == (16, 30)
    assert d.matvecs == op.calls == 16 * 30 and calls[-1] == (480, 480)
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(d.weights.sum(1), torch.ones(16, dtype=F64), atol=1e-12)
    negative = d.grid < 0
    mass_negative = float(torch.trapezoid(d.values[negative], d.grid[negative]))
    assert mass_negative == pytest.approx(0.3, abs=0.08)
    assert d.sigma == pytest.approx(0.01 * float(d.nodes.max() - d.nodes.min()))
    assert float(d.grid[0]) < float(evals.min()) and float(d.grid[-1]) > float(evals.max())


def test_density_custom_grid_and_sigma():
    a, _, _ = indefinite(60)
    grid = torch.linspace(-12, 24, 2000, dtype=F64)
    d = spectral_density(lambda v: a @ v, 60, num_vectors=4, steps=20, grid=grid, sigma=0.3)
    assert torch.equal(d.grid, grid) and d.sigma == 0.3
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-3)


def test_density_moments_match_traces():
    a, _, _ = indefinite(60, seed=3)
    d = spectral_density(lambda v: a @ v, 60, num_vectors=150, steps=8, generator=gen(4))
    for p, truth in ((1, float(a.trace()) / 60), (2, float((a @ a).trace()) / 60)):
        se = d.moment_stderr(p)
        assert se > 0 and abs(d.moment(p) - truth) < 4 * se, (p, d.moment(p), truth, se)
    # Rademacher starts: the first moment is Hutchinson on the same draws
    h = hutchinson(lambda v: a @ v, 60, 150 % 60 + 20, generator=gen(4))
    d2 = spectral_density(lambda v: a @ v, 60, num_vectors=150 % 60 + 20, steps=3, generator=gen(4))
    assert d2.moment(1) * 60 == pytest.approx(h.trace, rel=1e-10)


def test_density_gaussian_start_and_early_stop():
    a, _ = with_spectrum([2.0] * 20 + [-1.0] * 20)
    d = spectral_density(lambda v: a @ v, 40, num_vectors=3, steps=10, distribution="gaussian")
    assert d.matvecs == 3 * 2  # two distinct eigenvalues: each run stops after 2 steps
    assert d.nodes.shape == (3, 10) and bool((d.weights[:, 2:] == 0).all())
    assert d.moment(1) == pytest.approx(float((d.weights * d.nodes).sum(1).mean()))
    assert float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-3)


# -- determinism and errors ------------------------------------------------------------------------------

def test_same_seed_same_results_different_seed_differs():
    a, _, _ = indefinite(70)

    def runs(seed):
        return (
            lanczos(lambda v: a @ v, 70, 10, generator=gen(seed)).alphas,
            extreme_eigenpairs(lambda v: a @ v, 70, 2, max_steps=12, generator=gen(seed)).top_residuals,
            torch.tensor(hutchpp(lambda v: a @ v, 70, 12, generator=gen(seed)).trace),
            torch.tensor(hutchinson(lambda v: a @ v, 70, 12, generator=gen(seed)).trace),
            spectral_density(lambda v: a @ v, 70, num_vectors=2, steps=6, generator=gen(seed)).values,
        )

    first, again, other = runs(5), runs(5), runs(6)
    for x, y, z in zip(first, again, other, strict=True):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    # no generator: seeded with 0
    assert torch.equal(lanczos(lambda v: a @ v, 70, 5).alphas, lanczos(lambda v: a @ v, 70, 5).alphas)
    assert torch.equal(lanczos(lambda v: a @ v, 70, 5).alphas, lanczos(lambda v: a @ v, 70, 5, generator=gen(0)).alphas)


def test_bad_input_is_a_curvscope_error():
    a, _, _ = indefinite(20)
    with pytest.raises(CurvscopeError, match="which"):
        extreme_eigenpairs(lambda v: a @ v, 20, 2, which="middle")
    with pytest.raises(CurvscopeError, match="k must be"):
        extreme_eigenpairs(lambda v: a @ v, 20, 0)
    with pytest.raises(CurvscopeError, match="matvec returned"):
        lanczos(lambda v: v[:5], 20, 3)
    with pytest.raises(CurvscopeError, match="non-finite"):
        lanczos(lambda v: v * float("nan"), 20, 3)
    with pytest.raises(CurvscopeError, match="start vector"):
        lanczos(lambda v: a @ v, 20, 3, start=torch.zeros(20))
    with pytest.raises(CurvscopeError, match="distribution"):
        spectral_density(lambda v: a @ v, 20, distribution="uniform")
