"""The operators a user holds (curvscope.curvature.matfree.operator) against an independent dense G and H.

References, float64, written out here from plain autograd and nothing of curvscope: the Hessian of the batch
loss by ``torch.autograd.functional.hessian`` on the flat parameter vector; the GGN as ``(1/N) sum_n J_n^T H_n
J_n`` with ``J`` from ``torch.autograd.functional.jacobian`` and each ``H_n`` the Hessian of the sample's loss
w.r.t. its outputs. The losses are PyTorch's own modules. A parameter group's operator is the group's diagonal
block of these matrices.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvscope.curvature.matfree import (
    Operator,
    as_matvec,
    exact_trace,
    extreme_eigenpairs,
    ggn_operator,
    hessian_operator,
    hutchinson,
    hutchpp,
    lanczos,
    spectral_density,
)
from curvscope.errors import CurvscopeError
from curvscope.problem import make_problem

F64 = torch.float64
N, D_IN, HIDDEN, C = 6, 3, 5, 3
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss}
GROUPS = {"all": None, "layer 0": ("0.weight", "0.bias")}  # (layer 2 under mse: eigenvalues of multiplicity C)


def tiny_mlp(loss: str):
    """A float64 MLP 3 -> 5 -> 3 (tanh), a batch of 6 and its targets."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).to(F64)
    x = torch.randn(N, D_IN, generator=gen, dtype=F64)
    y = torch.randint(0, C, (N,), generator=gen) if loss == "ce" else torch.randn(N, C, generator=gen, dtype=F64)
    return model, x, y


def flat_function(model: nn.Module, x: torch.Tensor):
    """``theta -> f(theta, x)`` ``(N, C)`` on the flat parameter vector (``named_parameters()`` order)."""
    named = dict(model.named_parameters())

    def f(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, p in named.items():
            params[n] = theta[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return functional_call(model, params, (x,))

    return f, torch.cat([p.detach().reshape(-1) for p in named.values()])


def dense_hessian(model, x, y, loss: str) -> torch.Tensor:
    f, theta = flat_function(model, x)
    return torch.autograd.functional.hessian(lambda th: LOSSES[loss]()(f(th), y), theta)


def dense_ggn(model, x, y, loss: str) -> torch.Tensor:
    f, theta = flat_function(model, x)
    J = torch.autograd.functional.jacobian(f, theta)  # (N, C, D)
    outputs = f(theta).detach()
    G = torch.zeros(theta.numel(), theta.numel(), dtype=F64)
    for n in range(N):  # H_n: the Hessian of sample n's loss w.r.t. its outputs (mean over the batch: /N below)
        H_n = torch.autograd.functional.hessian(lambda o, n=n: LOSSES[loss]()(o[None], y[n:n + 1]), outputs[n])
        G += J[n].T @ H_n @ J[n]
    return G / N


def block(A: torch.Tensor, model: nn.Module, names) -> torch.Tensor:
    """The diagonal block of ``A`` of the parameters ``names`` (all when ``None``)."""
    index, i = [], 0
    for n, p in model.named_parameters():
        if names is None or n in names:
            index.append(torch.arange(i, i + p.numel()))
        i += p.numel()
    idx = torch.cat(index)
    return A[idx][:, idx]


CASES = [(loss, curvature, group) for loss in LOSSES for curvature in ("hessian", "ggn") for group in GROUPS]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def case(request):
    loss, curvature, group = request.param
    model, x, y = tiny_mlp(loss)
    problem = make_problem(model, x, y, loss=loss, dtype=F64, device="cpu")
    assert list(problem.params) == [n for n, _ in model.named_parameters()]
    names = GROUPS[group]
    reference = (dense_hessian if curvature == "hessian" else dense_ggn)(model, x, y, loss)
    factory = hessian_operator if curvature == "hessian" else ggn_operator
    return {"problem": problem, "model": model, "x": x, "y": y, "loss": loss, "curvature": curvature,
            "names": names, "factory": factory, "A": block(reference, model, names)}


def operator(case) -> Operator:
    return case["factory"](case["problem"], names=case["names"])


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def close(a, b, rtol: float = 1e-9, scale: float | None = None) -> None:
    """``|a - b| <= rtol * scale`` elementwise, ``scale`` by default ``max |b|``."""
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    scale = max(float(b.abs().max()) if scale is None else scale, 1e-300)
    assert float((a - b).abs().max()) <= rtol * scale, float((a - b).abs().max()) / scale


# -- the operator itself -----------------------------------------------------------------------------------------

def test_shape_dtype_device_and_symmetry(case):
    op, A = operator(case), case["A"]
    D = A.shape[0]
    assert op.shape == (D, D) and op.dim == D and op.dtype == F64 and op.device == torch.device("cpu")
    assert op.T is op and op.adjoint() is op
    u, v = randn(D, seed=1), randn(D, seed=2)
    assert float(u @ (op @ v)) == pytest.approx(float(v @ (op @ u)), rel=1e-10, abs=1e-14)
    close(op.dense(), A)


def test_matmul_vector_and_matrix(case):
    op, A = operator(case), case["A"]
    D = A.shape[0]
    v = randn(D, seed=3)
    out = op @ v
    assert out.shape == (D,) and not out.requires_grad
    close(out, A @ v)
    X = randn(D, 4, seed=4)
    before = op.count
    out = op @ X
    assert out.shape == (D, 4) and op.count == before + 4
    close(out, A @ X)
    close(op.matmat(X), A @ X)
    assert (op @ torch.zeros(D, 0, dtype=F64)).shape == (D, 0)
    close(op @ v.float(), A @ v, rtol=1e-6)  # cast to the operator's dtype; the result is in it
    assert (op @ v.float()).dtype == F64


def test_matmul_dict_and_list(case):
    op, A, model = operator(case), case["A"], case["model"]
    shapes = {n: p.shape for n, p in model.named_parameters() if case["names"] is None or n in case["names"]}
    D = A.shape[0]
    v = randn(D, seed=5)
    parts = op.unflatten(v)
    assert list(parts) == list(shapes) and all(parts[n].shape == s for n, s in shapes.items())
    expected = op.unflatten(A @ v)
    out = op @ parts
    assert isinstance(out, dict) and list(out) == list(shapes)
    for n in shapes:
        assert out[n].shape == shapes[n]
        close(out[n], expected[n])
    listed = op @ list(parts.values())
    assert isinstance(listed, list) and len(listed) == len(shapes)
    for got, n in zip(listed, shapes, strict=True):
        close(got, expected[n])
    close(torch.cat([t.reshape(-1) for t in op @ tuple(parts.values())]), A @ v)
    # a trailing column dimension K: a matrix in parameter shapes, (*shape, K) -> (*shape, K)
    X = randn(D, 3, seed=6)
    columns = {n: t.movedim(0, -1) for n, t in op.unflatten(X.T).items()}
    out = op @ columns
    expected = {n: t.movedim(0, -1) for n, t in op.unflatten((A @ X).T).items()}
    for n in shapes:
        assert out[n].shape == (*shapes[n], 3)
        close(out[n], expected[n])


def test_left_multiplication_is_the_transpose(case):
    op, A = operator(case), case["A"]
    D = A.shape[0]
    v, X = randn(D, seed=7), randn(2, D, seed=8)
    close(v @ op, A @ v)
    out = X @ op
    assert out.shape == (2, D)
    close(out, X @ A)


def test_wrong_inputs_name_the_expected_shape(case):
    op = operator(case)
    D = op.dim
    for bad in (torch.zeros(D + 1, dtype=F64), torch.zeros(1, D, dtype=F64), torch.zeros(D, 2, 1, dtype=F64)):
        with pytest.raises(CurvscopeError, match=rf"\({D},\) or a matrix of shape \({D}, K\)"):
            op @ bad
    with pytest.raises(CurvscopeError, match=rf"\({D}, K\)"):
        op.matmat(torch.zeros(D + 1, 2, dtype=F64))
    parts = op.unflatten(torch.zeros(D, dtype=F64))
    first = op.names[0]
    with pytest.raises(CurvscopeError, match=f"missing {first}"):
        op @ {n: t for n, t in parts.items() if n != first}
    with pytest.raises(CurvscopeError, match="not in the group: extra"):
        op @ {**parts, "extra": torch.zeros(1)}
    with pytest.raises(CurvscopeError, match=re.escape(f"tensors of shapes {[tuple(s) for s in op.shapes]}")):
        op @ [t.reshape(-1) if t.ndim > 1 else t[None] for t in parts.values()]
    with pytest.raises(CurvscopeError, match="tensors of shapes"):
        op @ list(parts.values())[:-1]
    with pytest.raises(CurvscopeError, match="to_scipy"):
        op @ np.zeros(D)
    with pytest.raises(CurvscopeError, match=rf"\(K, {D}\)"):
        torch.zeros(D, 2, dtype=F64) @ op


# -- SciPy -------------------------------------------------------------------------------------------------------

def test_to_scipy_products_and_eigsh(case):
    linalg = pytest.importorskip("scipy.sparse.linalg")
    op, A = operator(case), case["A"]
    D = A.shape[0]
    L = op.to_scipy()
    assert isinstance(L, linalg.LinearOperator) and L.shape == (D, D) and L.dtype == np.float64
    v, X = randn(D, seed=9), randn(D, 3, seed=10)
    for got in (L.matvec(v.numpy()), L @ v.numpy(), L.rmatvec(v.numpy()), L.matvec(v.numpy()[:, None])[:, 0]):
        assert isinstance(got, np.ndarray) and got.dtype == np.float64
        close(torch.from_numpy(got), A @ v)
    close(torch.from_numpy(L.matmat(X.numpy())), A @ X)
    close(torch.from_numpy(L.T @ X.numpy()), A @ X)
    complex_v = v.numpy() + 1j * randn(D, seed=11).numpy()
    close(torch.from_numpy(L.matvec(complex_v).imag), A @ randn(D, seed=11))
    assert op.to_scipy(np.float32).matvec(v.numpy()).dtype == np.float32
    top = np.sort(linalg.eigsh(L, k=3, which="LA", return_eigenvectors=False))[::-1]
    evals = torch.linalg.eigvalsh(A)
    close(torch.from_numpy(top.copy()), evals.flip(0)[:3], scale=float(evals.abs().max()))


def test_to_scipy_without_scipy_names_the_install(case, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)  # import scipy.sparse.linalg now fails
    with pytest.raises(CurvscopeError, match="pip install scipy"):
        operator(case).to_scipy()


# -- curvscope's estimators on every kind of operator --------------------------------------------------------

def forms(op: Operator) -> dict[str, tuple]:
    """The same operator as ``(operator, dim)`` in every form the estimators take (SciPy's where installed)."""
    out = {"Operator": (op, None), "bound matvec": (op.matvec, op.dim), "function": (lambda v: op @ v, op.dim),
           "dense tensor": (op.dense(), None)}
    try:
        out["scipy"] = (op.to_scipy(), None)
    except CurvscopeError:
        pass
    return out


def test_estimators_take_operators_functions_and_scipy(case):
    op, A = operator(case), case["A"]
    D = A.shape[0]
    evals = torch.linalg.eigvalsh(A)
    which = "both" if case["curvature"] == "hessian" else "largest"
    estimates = {}
    for label, (form, dim) in forms(op).items():
        res = extreme_eigenpairs(form, dim, 3, which=which, tol=1e-10, max_steps=D)
        assert res.converged, label
        close(res.top, evals.flip(0)[:3], scale=float(evals.abs().max()))
        if which == "both":
            close(res.bottom, evals[:3], scale=float(evals.abs().max()))
        exact = exact_trace(form, dim)
        assert exact.matvecs == D and exact.trace == pytest.approx(float(A.trace()), rel=1e-10, abs=1e-12), label
        assert hutchpp(form, dim, D).trace == pytest.approx(float(A.trace()), rel=1e-10, abs=1e-12), label
        run = lanczos(form, dim, 8)
        estimates[label] = (hutchpp(form, dim, 9).trace, hutchinson(form, dim, 5).trace, run.alphas, run.betas,
                            spectral_density(form, dim, num_vectors=2, steps=6).nodes)
    first = estimates["Operator"]
    for label, got in estimates.items():  # the same random draws whatever the form
        assert got[0] == pytest.approx(first[0], rel=1e-9, abs=1e-12), label
        assert got[1] == pytest.approx(first[1], rel=1e-9, abs=1e-12), label
        for a, b in zip(got[2:], first[2:], strict=True):
            close(a, b, rtol=1e-8, scale=float(evals.abs().max()))


def test_keywords_and_positional_calls_agree():
    model, x, y = tiny_mlp("ce")
    op = hessian_operator(make_problem(model, x, y, loss="ce", dtype=F64, device="cpu"))
    a = extreme_eigenpairs(op.matvec, op.dim, 2, tol=1e-9)
    b = extreme_eigenpairs(op, k=2, tol=1e-9)
    assert torch.equal(a.top, b.top) and torch.equal(a.bottom, b.bottom)
    assert hutchpp(op.matvec, op.dim, 12).trace == hutchpp(op, num_matvecs=12).trace
    assert torch.equal(lanczos(op.matvec, op.dim, 5).alphas, lanczos(op, steps=5).alphas)


def test_as_matvec_resolves_and_checks():
    A = randn(5, 5, seed=12)
    A = A + A.T
    matvec, dim = as_matvec(A)
    assert dim == 5
    close(matvec(torch.ones(5, dtype=F64)), A.sum(1))
    assert as_matvec(lambda v: A @ v, 5)[1] == 5
    with pytest.raises(CurvscopeError, match="dim is required"):
        as_matvec(lambda v: A @ v)
    with pytest.raises(CurvscopeError, match=r"dim=4 does not match the operator's shape \(5, 5\)"):
        as_matvec(A, 4)
    with pytest.raises(CurvscopeError, match=r"square, of shape \(D, D\); got shape \(5, 4\)"):
        as_matvec(A[:, :4])
    with pytest.raises(CurvscopeError, match="cannot use a str as a linear operator"):
        as_matvec("A")
    matvec, dim = as_matvec(A.numpy())  # NumPy arrays cross as arrays
    close(matvec(torch.ones(5, dtype=F64)), A.sum(1))
    with pytest.raises(CurvscopeError, match="dim is required"):
        extreme_eigenpairs(lambda v: A @ v, k=1)


# -- curvlinops ------------------------------------------------------------------------------------------------

def curvlinops_operator(case):
    """curvlinops' operator of the case: a torch ``CurvatureLinearOperator`` (curvlinops >= 2) or a SciPy
    ``LinearOperator`` (older versions)."""
    curvlinops = pytest.importorskip("curvlinops")
    cls = curvlinops.HessianLinearOperator if case["curvature"] == "hessian" else curvlinops.GGNLinearOperator
    model, names = case["model"], case["names"]
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    return cls(model, LOSSES[case["loss"]](), params, [(case["x"], case["y"])], num_data=N)


def test_curvlinops_operators_in_curvscope_estimators(case):
    cl, A = curvlinops_operator(case), case["A"]
    D = A.shape[0]
    assert tuple(cl.shape) == (D, D)
    evals = torch.linalg.eigvalsh(A)
    candidates = [cl] + ([cl.to_scipy()] if hasattr(cl, "to_scipy") else [])
    for form in candidates:  # the torch operator and its SciPy export (or the SciPy operator of old versions)
        res = extreme_eigenpairs(form, k=3, which="both", tol=1e-9, max_steps=D)
        assert res.converged
        close(res.top, evals.flip(0)[:3], rtol=1e-7, scale=float(evals.abs().max()))
        close(res.bottom, evals[:3], rtol=1e-7, scale=float(evals.abs().max()))
        assert exact_trace(form).trace == pytest.approx(float(A.trace()), rel=1e-8, abs=1e-10)
