"""The matrix-free spectrum at scale and at the edges (#20): repeated eigenvalues reported with their multiplicity,
a bounded basis planned from the memory budget, a budget too small refused up front with the bytes needed."""

from __future__ import annotations

import pytest
import torch
from helpers import flat_params, unflatten_params
from torch import nn

import curvscope
from curvscope.curvature.matfree import compute_matfree_spectrum
from curvscope.errors import OptionError

F64 = torch.float64


def _dense_hessian(problem) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda th: problem.loss_value(unflatten_params(problem, th)),
                                             flat_params(problem))


def _linear_regression():
    """3 outputs under MSE: the Hessian is I_3 (x) (2/3 X^T X / N), every eigenvalue three times."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randn(40, 3)
    return curvscope.make_problem(nn.Linear(6, 3, bias=False), x, y, loss="mse", dtype=F64)


def _softmax_regression():
    """10 classes on 4 features: a rank-deficient Hessian with a large null space."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 4), torch.randint(0, 10, (30,))
    return curvscope.make_problem(nn.Linear(4, 10), x, y, loss="ce", dtype=F64)


def test_repeated_top_eigenvalues_come_with_their_multiplicity():
    problem = _linear_regression()
    want = torch.linalg.eigvalsh(_dense_hessian(problem)).flip(0)[:5]
    assert float(want[0] - want[2]) < 1e-12 and float(want[3] - want[4]) < 1e-12  # [a, a, a, b, b]
    res = compute_matfree_spectrum(problem, curvature="hessian", top_k=5, tol=1e-8, trace_matvecs=0,
                                   density_vectors=0)
    g = res.groups[0]
    torch.testing.assert_close(g.eigenvalues, want, rtol=1e-7, atol=1e-10)
    assert g.converged and g.certain == 5


def test_a_null_space_gives_the_bottom_zeros():
    problem = _softmax_regression()
    evals = torch.linalg.eigvalsh(_dense_hessian(problem))
    assert int((evals.abs() < 1e-10).sum()) >= 5
    res = compute_matfree_spectrum(problem, curvature="hessian", top_k=5, tol=1e-8, trace_matvecs=0,
                                   density_vectors=0)
    g = res.groups[0]
    assert float(g.bottom.abs().max()) < 1e-7 * float(evals.abs().max())
    torch.testing.assert_close(g.eigenvalues, evals.flip(0)[:5], rtol=1e-7, atol=1e-9)


def test_a_small_budget_takes_fewer_default_eigenvalues_and_says_so():
    problem = _softmax_regression()  # D = 50 float64 numbers: 400 bytes a vector
    D = problem.num_params
    res = compute_matfree_spectrum(problem, curvature="hessian", top_k=None, max_memory=3 * D * 8 + 12 * D * 8,
                                   tol=1e-8, trace_matvecs=0, density_vectors=0)
    g = res.groups[0]
    assert 1 <= g.eigenvalues.numel() < 10 and g.max_basis <= 12
    assert res.notes and "memory budget" in res.notes[0]
    want = torch.linalg.eigvalsh(_dense_hessian(problem)).flip(0)
    assert g.lambda_max == pytest.approx(float(want[0]), rel=1e-7)


def test_a_budget_too_small_for_one_eigenvalue_is_refused_with_the_bytes_needed():
    problem = _softmax_regression()
    with pytest.raises(OptionError, match=r"max_memory .* too small: .* need at least [0-9,]+ bytes"):
        compute_matfree_spectrum(problem, curvature="hessian", top_k=None, max_memory=4 * 8 * problem.num_params,
                                 trace_matvecs=0, density_vectors=0)
    with pytest.raises(OptionError, match="max_memory"):  # an explicit top_k that does not fit
        compute_matfree_spectrum(problem, curvature="hessian", top_k=10, max_memory=20 * 8 * problem.num_params,
                                 trace_matvecs=0, density_vectors=0)


def test_a_warm_start_from_the_top_eigenvector_needs_fewer_products():
    problem = _softmax_regression()
    cold = compute_matfree_spectrum(problem, curvature="ggn", top_k=1, tol=1e-8, trace_matvecs=0, density_vectors=0,
                                    eigenvectors=True)
    start = torch.cat([v[0].reshape(-1) for v in cold.eigenvectors.values()])
    warm = compute_matfree_spectrum(problem, curvature="ggn", top_k=1, tol=1e-8, trace_matvecs=0, density_vectors=0,
                                    start=start + 1e-3 * torch.randn_like(start))
    assert warm.groups[0].lambda_max == pytest.approx(cold.groups[0].lambda_max, rel=1e-7)
    assert warm.groups[0].matvecs < cold.groups[0].matvecs


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc")
def test_a_two_million_parameter_model_stays_within_a_tight_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Tanh(), nn.Linear(1000, 1000), nn.Tanh(), nn.Linear(1000, 10))
    x, y = torch.randn(16, 1000), torch.randint(0, 10, (16,))
    problem = curvscope.make_problem(model, x, y, loss="ce", dtype=torch.float32)
    D = problem.num_params
    assert D > 2_000_000
    budget = 128 * 2**20
    peak, base = [0], _rss()

    def watch(stage, done, total):
        peak[0] = max(peak[0], _rss() - base)

    res = compute_matfree_spectrum(problem, curvature="ggn", top_k=1, max_memory=budget, tol=1e-4,
                                   trace_matvecs=30, density_vectors=1, density_steps=20, progress=watch)
    g = res.groups[0]
    assert g.converged and (g.max_basis + 3 * g.block_size) * D * 4 <= budget
    # the basis and work vectors within the budget; the products' own graphs come on top (a few vectors)
    assert peak[0] <= budget + 6 * D * 4, (peak[0] / 2**20, budget / 2**20)
    G = curvscope.ggn_operator(problem)  # an independent power iteration on the same products
    v = torch.randn(D, generator=torch.Generator().manual_seed(3))
    for _ in range(200):
        v = G @ (v / v.norm())
    assert g.lambda_max == pytest.approx(float(v.norm()), rel=1e-3)
    assert g.trace is not None and g.trace > 0 and res.density is not None  # streamed within the same budget
