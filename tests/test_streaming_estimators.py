"""The streaming estimators under a memory budget (``max_vectors``; curvscope.curvature.matfree.budget).

References: the same estimators without a budget, the dense trace and moments ``(1/D) tr(A^p)`` of a known
spectrum and of a tiny MLP's Hessian (``torch.autograd.functional.hessian``), and ``v^T A^p v`` of each SLQ start
vector computed densely. The peak-memory test measures the resident set of a fresh process on a diagonal operator
of 2e6 float32 numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvscope.curvature.matfree import exact_trace, hessian_operator, hutchinson, hutchpp, spectral_density
from curvscope.curvature.matfree.budget import (
    density_vectors,
    density_window,
    hutchpp_sketch,
    hutchpp_vectors,
    vectors_within,
)
from curvscope.curvature.matfree.vectors import _rademacher
from curvscope.errors import OptionError
from curvscope.problem import make_problem

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(evals, seed: int = 0) -> torch.Tensor:
    evals = torch.as_tensor(evals, dtype=F64)
    u, _ = torch.linalg.qr(torch.randn(evals.numel(), evals.numel(), generator=gen(seed), dtype=F64))
    return u @ torch.diag(evals) @ u.T


def indefinite(n: int = 120) -> torch.Tensor:
    bulk = torch.rand(n - 5, generator=gen(7), dtype=F64) * 4 - 1
    return with_spectrum(torch.cat([torch.tensor([20.0, 15.0, 14.9, -8.0, -5.0], dtype=F64), bulk]))


class Counting:
    def __init__(self, a: torch.Tensor):
        self.a, self.calls = a, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a @ v


@pytest.fixture(scope="module")
def tiny_hessian():
    """A tiny MLP's Hessian operator (D = 38) and its dense Hessian by torch.autograd.functional.hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x = torch.randn(6, 3, generator=gen(3), dtype=F64)
    y = torch.randint(0, 3, (6,), generator=gen(4))
    named = dict(model.named_parameters())

    def loss(theta):
        params, i = {}, 0
        for n, p in named.items():
            params[n] = theta[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return nn.CrossEntropyLoss()(functional_call(model, params, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])
    dense = torch.autograd.functional.hessian(loss, theta)
    op = hessian_operator(make_problem(model, x, y, loss="ce", dtype=F64, device="cpu"))
    return op, dense


# -- the budget helper ---------------------------------------------------------------------------------------------

def test_vectors_within():
    assert vectors_within(2**30, 124_000_000, 4) == 2
    assert vectors_within(100, 10, 4) == 2 and vectors_within(100, 10, 4, reserve=30) == 1
    assert vectors_within(100, 10, 4, reserve=200) == 0
    with pytest.raises(OptionError, match="dim"):
        vectors_within(100, 0, 4)


def test_plans_from_the_budget():
    assert hutchpp_sketch(60, None) == 20 and hutchpp_sketch(60, 40) == 20 and hutchpp_sketch(60, 7) == 5
    assert hutchpp_sketch(60, 2) == 0
    assert hutchpp_vectors(20, streamed=False) == 40 and hutchpp_vectors(5) == 7 and hutchpp_vectors(0) == 2
    assert density_vectors(40) == 45 and density_vectors(40, reorthogonalize=False) == 6
    assert density_window(40, None) is None and density_window(40, 45) is None and density_window(40, 44) == 40
    assert density_window(40, 10) == 8 and density_window(40, 5, reorthogonalize=False) == 2


def test_lean_rademacher_draws_the_same_vectors():
    for dim in (1, 1000, 100_003):
        a, b = gen(5), gen(5)
        for _ in range(2):
            old = torch.randint(0, 2, (dim,), generator=a).to(F64).mul_(2).sub_(1)
            assert torch.equal(_rademacher(dim, b, F64, torch.device("cpu")), old)
        assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))


def test_too_small_a_budget_names_the_bytes():
    a = indefinite(50)
    for call, need in ((lambda mv: hutchinson(a, num_matvecs=10, max_vectors=mv), 2),
                       (lambda mv: hutchpp(a, num_matvecs=10, max_vectors=mv), 2),
                       (lambda mv: exact_trace(a, max_vectors=mv), 2),
                       (lambda mv: spectral_density(a, max_vectors=mv), 4)):
        with pytest.raises(OptionError) as info:
            call(need - 1)
        assert info.value.field == "max_memory"
        assert f"needs at least {need} ({need * 50 * 8:,} bytes" in str(info.value)
        call(need)
    with pytest.raises(OptionError, match="max_vectors"):
        hutchinson(a, num_matvecs=10, max_vectors=-1)


# -- trace ---------------------------------------------------------------------------------------------------------

def test_streamed_hutchinson_and_exact_trace_are_the_unstreamed_ones():
    a = indefinite()
    assert hutchinson(a, num_matvecs=30, generator=gen(2), max_vectors=2) == hutchinson(a, num_matvecs=30,
                                                                                         generator=gen(2))
    assert exact_trace(a, max_vectors=2) == exact_trace(a)


def test_hutchpp_budget_large_enough_is_bitwise_the_default():
    a = indefinite()
    ref = hutchpp(a, num_matvecs=60, generator=gen(3))
    assert hutchpp(a, num_matvecs=60, generator=gen(3), max_vectors=40) == ref  # max(2 s, s + 3) with s = 20
    streamed = hutchpp(a, num_matvecs=60, generator=gen(3), max_vectors=22)  # s = 20 streamed: the same Q
    assert streamed.trace == pytest.approx(ref.trace, rel=1e-12)
    assert streamed.stderr == pytest.approx(ref.stderr, rel=1e-9)


@pytest.mark.parametrize("max_vectors", [3, 4, 7])
def test_streamed_hutchpp_uses_its_matvecs_and_is_unbiased(max_vectors):
    a = indefinite()
    truth = float(a.trace())
    op = Counting(a)
    runs = [hutchpp(op, 120, 30, generator=gen(s), max_vectors=max_vectors) for s in range(40)]
    assert op.calls == 40 * 30 and all(r.matvecs == 30 and r.method == "hutch++" for r in runs)
    traces = torch.tensor([r.trace for r in runs], dtype=F64)
    assert abs(float(traces.mean()) - truth) < 4 * float(traces.std()) / math.sqrt(40)
    # each run's stderr estimates the spread of its estimate
    ratio = float(traces.std()) / float(torch.tensor([r.stderr for r in runs]).mean())
    assert 0.6 < ratio < 1.6


def test_streamed_hutchpp_sketch_catches_a_low_rank_operator():
    evals = torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0], dtype=F64), torch.zeros(76, dtype=F64)])
    a = with_spectrum(evals, seed=2)
    est = hutchpp(a, num_matvecs=30, generator=gen(1), max_vectors=7)  # sketch of 5 >= rank 4
    assert est.trace == pytest.approx(110.0, rel=1e-10) and est.stderr < 1e-9
    op = Counting(a)
    assert hutchpp(op, 80, 30, generator=gen(1), max_vectors=12).matvecs == op.calls == 30  # dropped directions


def test_streamed_hutchpp_on_a_tiny_hessian_converges_to_the_dense_trace(tiny_hessian):
    op, dense = tiny_hessian
    truth = float(dense.trace())
    errors = []
    for m in (9, 36):  # a sketch of 3, then 3 and 30 Hutchinson vectors on the deflated Hessian
        traces = torch.tensor([hutchpp(op, num_matvecs=m, generator=gen(s), max_vectors=5).trace
                               for s in range(12)], dtype=F64)
        assert abs(float(traces.mean()) - truth) < 4 * float(traces.std()) / math.sqrt(12)
        errors.append(float(((traces - truth) ** 2).mean().sqrt()))
    assert errors[1] < 0.7 * errors[0]
    assert hutchpp(op, num_matvecs=38, max_vectors=2).trace == pytest.approx(truth, rel=1e-10)  # exact at D


# -- density -------------------------------------------------------------------------------------------------------

def test_density_with_room_for_the_basis_is_bitwise_the_default():
    a = indefinite()
    ref = spectral_density(a, num_vectors=3, steps=20, generator=gen(4))
    same = spectral_density(a, num_vectors=3, steps=20, generator=gen(4), max_vectors=25)
    assert torch.equal(same.values, ref.values) and torch.equal(same.nodes, ref.nodes)
    plain = spectral_density(a, num_vectors=3, steps=20, generator=gen(4), reorthogonalize=False)
    assert torch.equal(spectral_density(a, num_vectors=3, steps=20, generator=gen(4), reorthogonalize=False,
                                        max_vectors=6).values, plain.values)
    window = spectral_density(a, num_vectors=3, steps=20, generator=gen(4), max_vectors=22)  # window of 20
    assert torch.allclose(window.nodes, ref.nodes, rtol=0, atol=1e-12)
    assert torch.allclose(window.weights, ref.weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_vectors", [4, 8])
def test_windowed_quadrature_moments_are_exact_per_vector(max_vectors):
    """Each windowed run integrates v^T A^p v exactly for p <= 2m - 1, like the fully reorthogonalized run."""
    a = indefinite(80)
    d = spectral_density(a, num_vectors=3, steps=12, generator=gen(6), max_vectors=max_vectors)
    full = spectral_density(a, num_vectors=3, steps=12, generator=gen(6))
    draws = gen(6)
    starts = [_rademacher(80, draws, F64, torch.device("cpu")) for _ in range(3)]
    for p in (1, 2, 3, 6, 12, 23):
        exact = torch.stack([v @ torch.linalg.matrix_power(a, p) @ v / (v @ v) for v in starts])
        assert torch.allclose(d.vector_moments(p), exact, rtol=1e-9, atol=0)
        assert torch.allclose(full.vector_moments(p), exact, rtol=1e-9, atol=0)
    assert d.matvecs == 36 and float(torch.trapezoid(d.values, d.grid)) == pytest.approx(1.0, abs=1e-3)


def test_windowed_density_on_a_tiny_hessian_converges_to_the_dense_moments(tiny_hessian):
    op, dense = tiny_hessian
    many = spectral_density(op, num_vectors=80, steps=8, generator=gen(9), max_vectors=4)  # window of 2
    few = spectral_density(op, num_vectors=8, steps=8, generator=gen(9), max_vectors=4)
    for p in (1, 2, 3):
        truth = float(torch.trace(torch.linalg.matrix_power(dense, p))) / dense.shape[0]
        assert abs(many.moment(p) - truth) < 4 * many.moment_stderr(p)
        assert many.moment_stderr(p) < 0.6 * few.moment_stderr(p)


# -- measured memory -----------------------------------------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, sys, torch
    from curvscope.curvature.matfree import hutchinson, hutchpp, spectral_density

    def rss(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    D = 2_000_000
    diag = torch.linspace(0.0, 1.0, D, dtype=torch.float32)
    op = lambda v: diag * v
    kw = dict(dtype=torch.float32)
    runs = {
        "hutchinson": lambda: hutchinson(op, D, 4, max_vectors=2, **kw),
        "hutchpp": lambda: hutchpp(op, D, 12, max_vectors=5, **kw),
        "density": lambda: spectral_density(op, D, num_vectors=2, steps=8, max_vectors=5, **kw),
    }
    # warm up every kind of D-sized operation once (first calls keep a few buffers of their own)
    hutchpp(op, D, 3, max_vectors=3, **kw), spectral_density(op, D, num_vectors=1, steps=2, max_vectors=4, **kw)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        json.dump({"skip": f"cannot reset the peak resident set: {exc}"}, sys.stdout)
        sys.exit(0)
    out = {}
    for name, run in runs.items():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        base = rss("VmRSS:")
        result = run()
        out[name] = [rss("VmHWM:") - base, getattr(result, "trace", None)]
    json.dump(out, sys.stdout)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streamed_estimators_stay_within_a_budget_of_a_few_vectors():
    """2e6 float32 numbers (8 MB a vector): budgets of 2, 5 and 5 vectors, measured as the peak resident set."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}
    # a fixed mmap threshold: glibc returns every freed vector at once, so the resident set is what is held
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout)
    if "skip" in peaks:
        pytest.skip(peaks["skip"])
    vector = 2_000_000 * 4
    slack = 2**20  # allocator and interpreter bookkeeping, independent of the vectors' length (1/8 of a vector)
    for name, budget in (("hutchinson", 2), ("hutchpp", 5), ("density", 5)):
        assert peaks[name][0] <= budget * vector + slack, (name, peaks[name][0] / vector)
    assert peaks["hutchpp"][0] > 4 * vector  # the sketch really is held (3 vectors and 2 work vectors)
    assert peaks["hutchinson"][1] == pytest.approx(1e6, rel=1e-2)
