"""Large models (#20): the extreme eigenvalues in two vectors (``matfree/lean.py``) against dense references,
when the plan picks them, the matrix-free defaults of a large model, and ``dtype="auto"`` by the model's size."""

from __future__ import annotations

import pytest
import torch
from helpers import flat_params, unflatten_params
from torch import nn

import curvscope
from curvscope.curvature import method
from curvscope.curvature.matfree import compute_matfree_spectrum
from curvscope.curvature.matfree import spectrum as matfree_spectrum
from curvscope.curvature.matfree.lean import LEAN_VECTORS, lean_extremes
from curvscope.curvature.matfree.spectrum import plan_eigen
from curvscope.errors import OptionError

F64 = torch.float64


def _dense_hessian(problem) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda th: problem.loss_value(unflatten_params(problem, th)),
                                             flat_params(problem))


def _mlp_problem(dtype=F64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(24, 5), torch.randint(0, 4, (24,))
    return curvscope.make_problem(model, x, y, loss="ce", dtype=dtype)


def test_both_ends_of_a_hessian_equal_the_dense_eigenvalues():
    problem = _mlp_problem()
    evals = torch.linalg.eigvalsh(_dense_hessian(problem))
    H = curvscope.hessian_operator(problem)
    res = lean_extremes(H, which="both", tol=1e-9)
    assert res.converged and res.certain_top == 1 and res.certain_bottom == 1
    assert float(res.top[0]) == pytest.approx(float(evals[-1]), rel=1e-8)
    assert float(res.bottom[0]) == pytest.approx(float(evals[0]), rel=1e-8, abs=1e-10)
    assert res.max_basis == 0 and res.peak_vectors == LEAN_VECTORS
    assert float(res.top_residuals[0]) <= 1e-9 * res.norm_estimate


def test_repeated_and_null_extremes_and_scipy_operators():
    torch.manual_seed(1)
    U = torch.linalg.qr(torch.randn(500, 8, dtype=F64))[0]
    A = U @ torch.diag(torch.tensor([4.0, 4.0, 4.0, 2.0, 1.0, 1.0, -3.0, -3.0], dtype=F64)) @ U.T
    res = lean_extremes(A, which="both", tol=1e-10)  # a triple top, a double bottom, a 492-dim null space
    assert float(res.top[0]) == pytest.approx(4.0, rel=1e-9) and float(res.bottom[0]) == pytest.approx(-3.0, rel=1e-9)
    scipy = pytest.importorskip("scipy.sparse.linalg")
    op = scipy.aslinearoperator(A.numpy())
    top = lean_extremes(op, which="largest", tol=1e-10)
    assert top.bottom.numel() == 0 and float(top.top[0]) == pytest.approx(4.0, rel=1e-9)
    low = lean_extremes(lambda v: A @ v, 500, which="smallest", tol=1e-10, start=U[:, 0])  # a start at lambda = 4
    assert float(low.bottom[0]) == pytest.approx(-3.0, rel=1e-9)


def test_a_product_cap_reached_first_is_reported_as_not_converged():
    torch.manual_seed(2)
    A = torch.randn(400, 400, dtype=F64)
    A = A + A.T
    res = lean_extremes(A, which="both", tol=1e-12, max_matvecs=10)
    assert res.matvecs == 10 and not res.converged
    assert float(res.top[0]) <= float(torch.linalg.eigvalsh(A)[-1]) + 1e-9  # a Ritz value: a lower bound


def test_the_plan_picks_three_vectors_for_one_eigenvalue_of_a_large_operator_or_a_small_budget():
    big = method.LARGE_MODEL_PARAMS + 1
    k, plan, note = plan_eigen(big, None, "both", 40 * big * 4, 4)
    assert (k, plan.solver, plan.max_basis) == (1, "lean", 0) and "large" in note
    k, plan, _ = plan_eigen(big, 2, "both", 40 * big * 4, 4)  # two per end: the block solver
    assert plan.solver == "block"
    k, plan, _ = plan_eigen(big, 1, "both", 40 * big * 4, 4, want_vectors=True)  # vectors: the block solver
    assert plan.solver == "block"
    small = 5000
    assert plan_eigen(small, 1, "both", 10**9, 8)[1].solver == "block"  # a roomy budget keeps the block solver
    assert plan_eigen(small, 1, "both", 8 * small * 8, 8)[1].solver == "lean"  # a basis cut short: two vectors
    with pytest.raises(OptionError, match=r"max_memory .* need at least [0-9,]+ bytes .*4 vectors"):
        plan_eigen(small, 1, "both", 3 * small * 8, 8)


def test_a_large_model_spectrum_takes_the_lean_solver_and_its_defaults(monkeypatch):
    problem = _mlp_problem()
    evals = torch.linalg.eigvalsh(_dense_hessian(problem))
    monkeypatch.setattr(method, "LARGE_MODEL_PARAMS", 20)  # this 76-parameter model counts as large
    monkeypatch.setattr(matfree_spectrum, "LARGE_MODEL_PARAMS", 20)
    res = curvscope.spectrum(problem, curvature="hessian", tol=1e-9)
    g = res.groups[0]
    assert g.solver == "lean" and g.eigenvalues.numel() == 1 and g.bottom.numel() == 1
    assert g.lambda_max == pytest.approx(float(evals[-1]), rel=1e-8)
    assert g.lambda_min == pytest.approx(float(evals[0]), rel=1e-8)
    assert g.density is not None and g.density.nodes.shape[0] == 1  # one SLQ vector
    assert any("large model" in n for n in res.notes)
    direct = compute_matfree_spectrum(problem, curvature="hessian", top_k=None, tol=1e-9, trace_matvecs=0,
                                      density_vectors=0)
    assert direct.groups[0].solver == "lean" and any("large operator" in n for n in direct.notes)


def test_matfree_defaults_follow_the_size_and_keep_what_is_given():
    small = method.matfree_defaults(1000, F64)
    assert (small.top_k, small.trace_matvecs, small.density_vectors, small.tol, small.note) == (None, 60, 4, 1e-6,
                                                                                                 None)
    big = method.matfree_defaults(124_000_000, torch.float32)
    assert (big.top_k, big.trace_matvecs, big.density_vectors, big.max_matvecs) == (1, 16, 1, 150)
    assert big.tol == 1e-4 and "124,000,000" in big.note
    given = method.matfree_defaults(124_000_000, torch.float32, top_k=3, trace_matvecs=0, density_vectors=2, tol=1e-3)
    assert (given.top_k, given.trace_matvecs, given.density_vectors, given.tol, given.max_matvecs,
            given.note) == (3, 0, 2, 1e-3, None, None)


def test_dtype_auto_is_float32_above_ten_million_parameters_on_the_cpu():
    from curvscope.problem import resolve_dtype

    assert resolve_dtype("auto", "cpu", 10_000_000) == F64
    assert resolve_dtype("auto", "cpu", 10_000_001) == torch.float32
    assert resolve_dtype("float64", "cpu", 10**9) == F64  # an explicit dtype is kept
    model = nn.Sequential(nn.Embedding(1_250_001, 8), nn.Flatten(), nn.Linear(16, 3))  # 10,000,059 parameters
    x, y = torch.randint(0, 1000, (4, 2)), torch.randint(0, 3, (4,))
    assert curvscope.make_problem(model, x, y, loss="ce").dtype == torch.float32


def test_a_loaded_large_model_runs_in_float32_and_says_why(tmp_path):
    from safetensors.torch import save_file

    from curvscope.io.load import load_problem

    (tmp_path / "big.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.Embedding(1_250_001, 8), nn.Flatten(), nn.Linear(16, 3))\n")
    save_file({"x": torch.randint(0, 1000, (4, 2)), "y": torch.randint(0, 3, (4,))}, str(tmp_path / "d.safetensors"))
    problem = load_problem(model=f"{tmp_path / 'big.py'}:make", data=str(tmp_path / "d.safetensors"), device="cpu")
    assert problem.dtype == torch.float32 and all(p.dtype == torch.float32 for p in problem.params.values())
    assert "10,000,059 parameters" in problem.info["dtype_note"]
    kept = load_problem(model=f"{tmp_path / 'big.py'}:make", data=str(tmp_path / "d.safetensors"), device="cpu",
                        dtype="float64")
    assert kept.dtype == F64 and "dtype_note" not in kept.info


def test_the_table_title_names_the_solver_plan():
    from curvscope.report.matfree_report import matfree_table

    group = {"name": "all", "num_params": 10, "lambda_max": 2.0, "lambda_min": -1.0, "converged": True}
    lean = {"curvature": "hessian", "approximation": {"matvecs": 40},
            "groups": [{**group, "solver": {"kind": "lean", "block_size": 1, "max_basis": 0}}]}
    block = {**lean, "groups": [{**group, "solver": {"kind": "block", "block_size": 2, "max_basis": 24}}]}
    assert str(matfree_table(lean).title) == "Hessian spectrum (Lanczos, 40 products, two vectors)"
    assert str(matfree_table(block).title) == "Hessian spectrum (Lanczos, 40 products, basis 24)"


def test_products_of_a_curvscope_operator_accumulate_into_the_previous_vector(monkeypatch):
    """Two vectors: after the first product (into a new buffer), each product is added into the previous Lanczos
    vector scaled by -beta, so every product lands in one of two storages."""
    problem = _mlp_problem()
    H = curvscope.hessian_operator(problem)
    into = []
    check = type(H)._check_out
    monkeypatch.setattr(type(H), "_check_out", lambda self, out, v: (into.append(out.data_ptr()), check(self, out, v)))
    res = lean_extremes(H.matvec, H.dim, tol=1e-10, dtype=F64)
    plain = lean_extremes(lambda v: H.matvec(v), H.dim, tol=1e-10, dtype=F64)
    assert len(into) == res.matvecs and len(set(into)) == 2  # the first product's buffer and the start vector's
    torch.testing.assert_close(res.top, plain.top, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.bottom, plain.bottom, rtol=1e-12, atol=0)


def test_a_non_finite_product_is_an_error_at_its_step():
    d = torch.linspace(1.0, 2.0, 50, dtype=F64)
    for bad in (float("nan"), float("inf"), -float("inf")):
        calls = []

        def matvec(v, bad=bad, calls=calls):
            calls.append(1)
            w = d * v
            if len(calls) == 3:
                w[7] = bad
            return w

        with pytest.raises(curvscope.CurvscopeError, match="non-finite values at Lanczos step 3"):
            lean_extremes(matvec, 50, tol=1e-12, dtype=F64)


def test_float32_vectors_keep_the_ritz_values_at_or_below_lambda_max():
    # dot products of 2e5 float32 entries lose ~1e-5 of their value; accumulated in float64 they do not
    torch.manual_seed(0)
    n = 200_000
    d = torch.cat([torch.tensor([100.0, 60.0, 59.0]), torch.randn(n - 3) * 3]).float()
    res = lean_extremes(lambda v: d * v, n, which="both", tol=1e-6, dtype=torch.float32)
    assert res.converged
    assert float(res.top[0]) == pytest.approx(100.0, rel=1e-6)
    assert float(res.bottom[0]) == pytest.approx(float(d.min()), rel=1e-6)
