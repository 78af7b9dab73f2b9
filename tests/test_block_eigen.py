"""The block Krylov eigensolver (curvscope.curvature.matfree.block) against dense float64 references."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from curvscope.curvature.matfree.block import BlockPlan, block_eigenpairs, min_basis, plan_block
from curvscope.errors import CurvscopeError, OptionError

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(evals, seed: int = 0) -> torch.Tensor:
    """``U diag(evals) U^T`` with a random orthogonal U."""
    evals = torch.as_tensor(evals, dtype=F64)
    u, _ = torch.linalg.qr(torch.randn(evals.numel(), evals.numel(), generator=gen(seed), dtype=F64))
    return u @ torch.diag(evals) @ u.T


def random_symmetric(n: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen(seed), dtype=F64)
    return (a + a.T) / 2


class Counting:
    """``v -> A v`` counting the vectors it is applied to; with ``matmat`` it takes ``(dim, c)`` blocks."""

    def __init__(self, a: torch.Tensor, matmat: bool = False):
        self.a, self.calls, self.vectors, self.supports_matmat = a, 0, 0, matmat
        self.shape = a.shape

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == self.a.shape[0] and (self.supports_matmat or x.dim() == 1)
        self.calls += 1
        self.vectors += 1 if x.dim() == 1 else x.shape[1]
        return self.a.to(x.dtype) @ x


def top_bottom(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ref = torch.linalg.eigvalsh(a)
    return ref.flip(0)[:k], ref[:k]


def assert_pairs(a: torch.Tensor, res, k: int, atol: float) -> None:
    """Values equal the dense reference, residuals are true and small, vectors orthonormal."""
    top, bottom = top_bottom(a, k)
    norm = float(torch.linalg.matrix_norm(a, 2))
    if res.top.numel():
        assert torch.allclose(res.top.to(F64), top, atol=atol * norm, rtol=0), (res.top, top)
    if res.bottom.numel():
        assert torch.allclose(res.bottom.to(F64), bottom, atol=atol * norm, rtol=0), (res.bottom, bottom)
    for values, residuals, vectors in ((res.top, res.top_residuals, res.top_vectors),
                                       (res.bottom, res.bottom_residuals, res.bottom_vectors)):
        assert (residuals <= res.tol * res.norm_estimate).all()
        if vectors is not None and values.numel():
            v = vectors.to(F64)
            true = torch.linalg.vector_norm(v @ a - values.to(F64)[:, None] * v, dim=1)
            assert torch.allclose(true, residuals.to(F64), atol=10 * atol * norm)
            assert torch.allclose(v @ v.T, torch.eye(values.numel(), dtype=F64), atol=1e-4)
    copied = res.top.numel() + res.bottom.numel() if res.top_vectors is not None else 0
    assert res.peak_vectors <= res.max_basis + max(3 * res.block_size, copied)


# -- correctness -----------------------------------------------------------------------------------------

def test_random_symmetric_both_ends():
    a = random_symmetric(150)
    res = block_eigenpairs(a, k=4, which="both", tol=1e-9, want_vectors=True, generator=gen(1))
    assert res.converged and res.certain_top == res.certain_bottom == 4 and res.restarts > 0
    assert_pairs(a, res, 4, 1e-10)
    assert res.norm_estimate <= float(torch.linalg.matrix_norm(a, 2)) * (1 + 1e-12)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_one_end_with_a_callable(which):
    a = random_symmetric(120, seed=3)
    op = Counting(a)
    res = block_eigenpairs(lambda v: op @ v, 120, 3, which=which, tol=1e-8, block_size=2, want_vectors=True)
    assert res.converged and (res.top.numel() == 0) == (which == "smallest")
    assert res.matvecs == op.vectors and res.steps < res.matvecs
    assert_pairs(a, res, 3, 1e-9)


def linear_regression_hessian(outputs: int = 3, features: int = 40, n: int = 60) -> torch.Tensor:
    """The Hessian of MSE linear regression with ``outputs`` targets: every eigenvalue ``outputs`` times."""
    g = gen(5)
    x, y = torch.randn(n, features, generator=g, dtype=F64), torch.randn(n, outputs, generator=g, dtype=F64)
    x = x * torch.linspace(0.3, 2.0, features, dtype=F64)  # a spread spectrum

    def loss(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[: outputs * features].reshape(outputs, features), theta[outputs * features:]
        return torch.nn.functional.mse_loss(x @ w.T + b, y)

    h = torch.autograd.functional.hessian(loss, torch.zeros(outputs * (features + 1), dtype=F64))
    return (h + h.T) / 2


@pytest.mark.parametrize("block_size", [5, 2])
def test_linear_regression_multiplicities(block_size):
    """Top-5 = [a, a, a, b, b]; single-vector Lanczos reports [a, b, c, ...] here."""
    h = linear_regression_hessian()
    top = torch.linalg.eigvalsh(h).flip(0)[:5]
    assert torch.allclose(top[:3], top[0].expand(3), rtol=1e-10) and top[3] < top[2] * (1 - 1e-3)
    res = block_eigenpairs(h, k=5, which="largest", tol=1e-8, block_size=block_size, max_basis=24,
                           want_vectors=True)
    assert res.converged and res.certain_top == 5
    assert_pairs(h, res, 5, 1e-8)
    # a block of 5 holds every copy; with 2, the clusters of 3 need final checks (and locking in the small basis)
    assert res.checks == 0 if block_size == 5 else res.checks >= 1 and res.restarts > 0


def test_diagonal_operator_with_repeated_top():
    d = torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.0, 4.0]), torch.linspace(-1.0, 3.0, 495, dtype=F64)])
    res = block_eigenpairs(lambda v: d * v, 500, 5, which="largest", tol=1e-8)
    assert res.converged and res.certain_top == 5 and res.checks >= 1  # block 2 < the cluster of 3: a final check
    assert torch.allclose(res.top, d[:5], atol=1e-7)


def test_softmax_regression_null_space():
    """Bottom-5 of a softmax regression Hessian with a big null space are five zeros."""
    g = gen(7)
    n, features, classes = 4, 30, 5
    x, y = torch.randn(n, features, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[: classes * features].reshape(classes, features), theta[classes * features:]
        return torch.nn.functional.cross_entropy(x @ w.T + b, y)

    h = torch.autograd.functional.hessian(loss, 0.1 * torch.randn(classes * (features + 1), generator=g, dtype=F64))
    h = (h + h.T) / 2
    ref = torch.linalg.eigvalsh(h)
    assert int((ref.abs() < 1e-12 * ref.max()).sum()) >= 130
    res = block_eigenpairs(h, k=5, tol=1e-8, generator=gen(2))
    assert res.converged and res.certain_bottom == 5
    assert (res.bottom.abs() <= 1e-8 * res.norm_estimate).all()
    assert_pairs(h, res, 5, 1e-8)


def test_block_smaller_than_k_locks_and_checks():
    """Block size 2 < k = 6 with clusters of 3: locking within a small basis finds every copy."""
    evals = torch.cat([torch.tensor([8.0, 8.0, 8.0, 7.0, 6.5, 6.5, 6.5]), torch.linspace(-1, 5, 193, dtype=F64)])
    a = with_spectrum(evals, seed=4)
    res = block_eigenpairs(a, k=6, which="largest", block_size=2, max_basis=16, tol=1e-8, want_vectors=True)
    assert res.converged and res.certain_top == 6 and res.restarts > 0
    assert_pairs(a, res, 6, 1e-8)
    assert res.peak_vectors <= 16 + 3 * 2


def test_exact_start_needs_verify():
    """An exact-eigenvector start is not generic; ``verify=True`` runs the final check and finds the copy."""
    evals = torch.cat([torch.tensor([5.0, 5.0, 4.0]), torch.linspace(0, 3, 97, dtype=F64)])
    a = with_spectrum(evals, seed=6)
    vecs = torch.linalg.eigh(a).eigenvectors
    start = torch.stack([vecs[:, -1], vecs[:, -3]], dim=1)  # one copy of 5, and 4
    res = block_eigenpairs(a, k=2, which="largest", start=start, verify=True, tol=1e-8)
    assert res.converged and res.checks >= 1
    assert torch.allclose(res.top, torch.tensor([5.0, 5.0], dtype=F64), atol=1e-7)


def test_tiny_operator_is_exact():
    a = random_symmetric(5, seed=8)
    res = block_eigenpairs(a, k=10, tol=1e-12)
    assert res.top.numel() == res.bottom.numel() == 5 and res.converged
    assert torch.allclose(res.top, torch.linalg.eigvalsh(a).flip(0), atol=1e-12)


# -- memory ----------------------------------------------------------------------------------------------

def test_plan_block_fits_the_budget():
    plan = plan_block(10_000, 5, "largest", 40 * 10_000 * 8, 8)
    assert isinstance(plan, BlockPlan) and plan.bytes <= 40 * 10_000 * 8
    assert plan.max_basis >= min_basis(10_000, 5, "largest", plan.block_size)
    assert plan_block(10_000, 5, "both", None, 8).block_size == 2 and plan_block(10, 1, "both", None, 8).block_size == 1
    assert plan_block(10_000, 5, "both", None, 8, block_size=5).block_size == 5
    small = plan_block(10_000, 5, "largest", 12 * 10_000 * 8, 8)
    assert small.block_size == 1 and small.bytes <= 12 * 10_000 * 8


def test_budget_too_small_names_the_bytes():
    with pytest.raises(OptionError) as err:
        plan_block(1_000_000, 3, "largest", 4 * 4_000_000, 4)
    need = (min_basis(1_000_000, 3, "largest", 1) + 3) * 4_000_000
    assert err.value.field == "max_memory" and f"{need:,} bytes" in str(err.value)


def test_tiny_budget_still_converges():
    a = with_spectrum(torch.cat([torch.tensor([4.0, 3.5]), torch.linspace(-1, 2, 198, dtype=F64)]), seed=9)
    plan = plan_block(200, 2, "largest", 8 * 200 * 8, 8)
    assert plan.max_basis <= 6
    res = block_eigenpairs(a, k=2, which="largest", block_size=plan.block_size, max_basis=plan.max_basis, tol=1e-8,
                           max_matvecs=2000)
    assert res.converged and res.restarts > 5 and res.peak_vectors * 200 * 8 <= plan.bytes
    assert_pairs(a, res, 2, 1e-8)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_large_diagonal_operator_within_budget():
    dim = 2_000_000
    d = torch.linspace(0.0, 1.0, dim)
    d[:3] = torch.tensor([2.0, 1.8, 1.6])
    budget = 20 * dim * 4
    plan = plan_block(dim, 3, "largest", budget, 4)
    peak, stop = [_rss()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    before = _rss()
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        res = block_eigenpairs(lambda v: d * v, dim, 3, which="largest", tol=1e-4, dtype=torch.float32,
                               block_size=plan.block_size, max_basis=plan.max_basis)
    finally:
        stop.set()
        thread.join()
    assert res.converged and res.top.dtype == torch.float32
    assert torch.allclose(res.top, torch.tensor([2.0, 1.8, 1.6]), atol=1e-4 * 2)
    assert res.peak_vectors * dim * 4 <= budget
    assert peak[0] - before <= 1.25 * budget, (peak[0] - before) / budget


# -- warm start, float32, budgets, progress ----------------------------------------------------------------

def test_warm_start_takes_fewer_products():
    a = with_spectrum(torch.cat([torch.tensor([9.0, 8.0, 7.5, 7.0]), torch.linspace(-2, 6, 196, dtype=F64)]))
    cold = block_eigenpairs(a, k=4, which="largest", tol=1e-8, want_vectors=True)
    exact = block_eigenpairs(a, k=4, which="largest", tol=1e-8, start=cold.top_vectors.T)
    assert exact.converged and exact.matvecs <= 3 * 4 and cold.matvecs > 5 * exact.matvecs
    b = a + 1e-5 * random_symmetric(200, seed=11)  # the next checkpoint
    again = block_eigenpairs(b, k=4, which="largest", tol=1e-8)
    warm = block_eigenpairs(b, k=4, which="largest", tol=1e-8, start=cold.top_vectors.T)
    assert warm.converged and again.converged and warm.matvecs < again.matvecs
    assert torch.allclose(warm.top, again.top, atol=1e-7)


def test_wide_start_and_batched_operator():
    """A start of 6 vectors with block size 2: the Krylov block has 6 vectors, applied 2 at a time."""
    a = random_symmetric(100, seed=12)
    op = Counting(a, matmat=True)
    start = torch.randn(100, 6, generator=gen(3), dtype=F64)
    res = block_eigenpairs(op, k=3, block_size=2, start=start, tol=1e-8)
    assert res.converged and op.vectors == res.matvecs and op.calls * 2 >= res.matvecs
    assert_pairs(a, res, 3, 1e-8)


def test_float32_basis():
    a = random_symmetric(150, seed=13)
    a32 = a.float()
    res = block_eigenpairs(lambda v: a32 @ v, 150, 3, tol=1e-4, dtype=torch.float32, want_vectors=True)
    assert res.converged and res.top.dtype == res.top_vectors.dtype == torch.float32
    assert_pairs(a, res, 3, 1e-4)


def test_unconverged_says_how_many_are_certain():
    a = with_spectrum(torch.cat([torch.tensor([3.0]), torch.linspace(0, 2.99, 299, dtype=F64)]), seed=14)
    calls = []
    res = block_eigenpairs(a, k=3, which="largest", tol=1e-10, max_matvecs=20,
                           progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert not res.converged and res.certain_top < 3 and res.matvecs <= 20
    assert res.certain_top == int((res.top_residuals <= res.tol * res.norm_estimate).cumprod(0).sum())
    assert {c[0] for c in calls} == {"lanczos"} and all(c[2] == 20 for c in calls) and calls[-1][1] == 20
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)


def test_bad_options():
    a = random_symmetric(50)
    with pytest.raises(OptionError, match="max_basis"):
        block_eigenpairs(a, k=5, block_size=5, max_basis=10)
    with pytest.raises(OptionError, match="which"):
        block_eigenpairs(a, k=2, which="middle")
    with pytest.raises(CurvscopeError, match="dim"):
        block_eigenpairs(lambda v: v, k=2)
    with pytest.raises(CurvscopeError, match="returned"):
        block_eigenpairs(lambda v: v[:3], 50, 2)
