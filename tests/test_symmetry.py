"""Symmetry projections R, factors, f(Sigma) g and SymO against brute force on tiny float64 models.

The reference for R is the literal group average: every group element is enumerated (signed permutations /
permutations of each hidden layer, widths 2-3) and applied to the parameters as W_l -> V_l W_l V_{l-1}^T,
b_l -> V_l b_l; dense matrices use the test's own flattening (chain order, row-major).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from curvscope.cli.common import as_flags
from curvscope.curvature.symmetry import (
    DENSE_CAP,
    build_structure,
    inverse_sqrt,
    outer_sum_factors,
    project_dense,
    single_gradient_factors,
    symo_direction,
)
from curvscope.curvature.symmetry.chain import find_chain
from curvscope.curvature.symmetry.estimate import compute_factors
from curvscope.curvature.symmetry.symo import line_search
from curvscope.errors import CurvscopeError
from curvscope.models import mlp
from curvscope.problem import make_problem

F64 = torch.float64


def tiny(widths, bias=True, activation="tanh", seed=0):
    torch.manual_seed(seed)
    return mlp(widths[0], list(widths[1:-1]), widths[-1], activation=activation, bias=bias).to(F64)


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def expected_names(model):
    names = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            names.append(f"{i}.weight")
            if m.bias is not None:
                names.append(f"{i}.bias")
    return names


def chain_of(model):
    params = dict(model.named_parameters())
    chain = find_chain(model, params)
    assert list(chain.param_names) == expected_names(model)
    return chain


def flat(model, tensors):
    return torch.cat([tensors[n].reshape(-1) for n in expected_names(model)])


def unflat(model, vec):
    params = dict(model.named_parameters())
    out, off = {}, 0
    for n in expected_names(model):
        k = params[n].numel()
        out[n] = vec[off:off + k].reshape(params[n].shape)
        off += k
    return out


def hidden_groups(widths, kind):
    """All elements of the product group over the hidden layers, as tuples of matrices V_1..V_{L-1}."""
    per_layer = []
    for d in widths[1:-1]:
        mats = []
        for perm in itertools.permutations(range(d)):
            P = torch.eye(d, dtype=F64)[list(perm)]
            signs = [(1,) * d] if kind == "permutation" else itertools.product((1, -1), repeat=d)
            mats += [torch.diag(torch.tensor(s, dtype=F64)) @ P for s in signs]
        per_layer.append(mats)
    return list(itertools.product(*per_layer))


def group_matrix(model, widths, Vs):
    """The D x D matrix of one group element acting on the flattened chain (block-diagonal: row-major
    vec(V_o W V_i^T) = (V_o kron V_i) vec(W), and V_o b)."""
    L = len(widths) - 1
    blocks = []
    for l, m in enumerate(linears(model), start=1):
        Vo = Vs[l - 1] if l < L else torch.eye(widths[l], dtype=F64)
        Vi = Vs[l - 2] if l > 1 else torch.eye(widths[0], dtype=F64)
        blocks.append(torch.kron(Vo.contiguous(), Vi.contiguous()))
        if m.bias is not None:
            blocks.append(Vo)
    return torch.block_diag(*blocks)


def test_group_matrix_acts_on_parameters():
    widths = (2, 3, 2)
    model = tiny(widths)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(3, 3, generator=gen, dtype=F64)
    x = random_grad(model)
    y = {"1.weight": V @ x["1.weight"], "1.bias": V @ x["1.bias"], "3.weight": x["3.weight"] @ V.T,
         "3.bias": x["3.bias"]}
    assert torch.allclose(group_matrix(model, widths, [V]) @ flat(model, x), flat(model, y))


def brute_force_R(Gs, sigma):
    G = torch.stack(Gs) if isinstance(Gs, list) else Gs
    return (G @ sigma @ G.transpose(1, 2)).mean(0)


def random_psd(D, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D + 2, generator=g, dtype=F64)
    return A @ A.T


def random_grad(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in model.named_parameters()}


CASES = [((2, 3, 2), True), ((2, 2, 3, 2), True), ((3, 3, 2), False), ((2, 2, 2, 2, 3), False)]
SIGNED, PERM = ("signed-permutation", "signed"), ("permutation", "permutation")


@pytest.mark.parametrize("widths,bias,symmetry,kind", [
    *[(w, b, *SIGNED) for w, b in CASES],
    *[(w, b, *PERM) for w, b in CASES],
    ((2, 3, 2, 3, 2), True, *PERM),  # two hidden-to-hidden layers of width 3 (the group has 216 elements)
])
def test_projection_is_the_group_average(widths, bias, symmetry, kind):
    model = tiny(widths, bias)
    structure = build_structure(chain_of(model), symmetry)
    Gs = [group_matrix(model, widths, Vs) for Vs in hidden_groups(widths, kind)]
    D = structure.num_params
    sigma = random_psd(D)
    R = project_dense(structure, sigma).dense()
    assert torch.allclose(R, brute_force_R(Gs, sigma), atol=1e-10)
    # idempotent, and invariant under every group element
    assert torch.allclose(project_dense(structure, R).dense(), R, atol=1e-10)
    G = torch.stack(Gs)
    assert torch.allclose(G @ R @ G.transpose(1, 2), R.expand_as(G), atol=1e-10)
    # single gradient: the cheap factors are the dense projection of g g^T
    g = random_grad(model)
    gv = flat(model, g)
    single = single_gradient_factors(structure, g).dense()
    assert torch.allclose(single, brute_force_R(Gs, torch.outer(gv, gv)), atol=1e-10)
    # R is a projection that really removes something here
    assert (sigma - R).norm() > 1e-3 * sigma.norm()


def haar_orthogonal(d, gen):
    Q, Rm = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return Q * torch.sign(torch.diagonal(Rm))


@pytest.mark.parametrize("widths,bias", CASES)
def test_orthogonal_projection(widths, bias):
    model = tiny(widths, bias)
    structure = build_structure(chain_of(model), "orthogonal")
    sigma = random_psd(structure.num_params)
    R = project_dense(structure, sigma).dense()
    assert torch.allclose(project_dense(structure, R).dense(), R, atol=1e-10)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        G = group_matrix(model, widths, [haar_orthogonal(d, gen) for d in widths[1:-1]])
        assert torch.allclose(G @ G.T, torch.eye(G.shape[0], dtype=F64), atol=1e-10)
        assert torch.allclose(G @ R @ G.T, R, atol=1e-9)
    # only second moments of each V_h enter: the orthogonal average is the signed-permutation average ...
    signed = [group_matrix(model, widths, Vs) for Vs in hidden_groups(widths, "signed")]
    assert torch.allclose(R, brute_force_R(signed, sigma), atol=1e-10)
    # ... but not the permutation average (which keeps all-ones terms)
    perms = [group_matrix(model, widths, Vs) for Vs in hidden_groups(widths, "permutation")]
    assert (brute_force_R(perms, sigma) - R).norm() > 1e-3 * R.norm()


def test_single_gradient_closed_forms_orthogonal():
    # two layers: the joint (Phi_1, Psi_1, Phi_2) block with the hidden bias beside it
    model = tiny((3, 4, 2))
    s = build_structure(chain_of(model), "orthogonal")
    g = random_grad(model)
    g1, b1, g2, b2 = g["1.weight"], g["1.bias"], g["3.weight"], g["3.bias"]
    d1 = 4
    f = single_gradient_factors(s, g).blocks()
    expect = {"Phi_1": g1.T @ g1 / d1, "Phi_2": g2 @ g2.T / d1, "Psi_1": g1.T @ g2.T / d1,
              "phi_b1": b1 @ b1 / d1, "Phi_b2": torch.outer(b2, b2), "Psi_1_b1": g1.T @ b1 / d1,
              "Psi_b1_2": g2 @ b1 / d1}
    assert set(f) == set(expect)
    for k, v in expect.items():
        assert f[k].shape == v.shape and torch.allclose(f[k], v), k
    # three layers: phi_l for the hidden-to-hidden weight; no cross-layer weight blocks
    model = tiny((3, 4, 5, 2))
    s = build_structure(chain_of(model), "orthogonal")
    g = random_grad(model)
    g1, b1, g2, b2, g3, b3 = (g[n] for n in expected_names(model))
    f = single_gradient_factors(s, g).blocks()
    expect = {"Phi_1": g1.T @ g1 / 4, "phi_2": g2.pow(2).sum() / 20, "Phi_3": g3 @ g3.T / 5,
              "phi_b1": b1 @ b1 / 4, "phi_b2": b2 @ b2 / 5, "Phi_b3": torch.outer(b3, b3),
              "Psi_1_b1": g1.T @ b1 / 4, "Psi_b2_3": g3 @ b2 / 5}
    assert set(f) == set(expect)
    for k, v in expect.items():
        assert f[k].shape == v.shape and torch.allclose(f[k], v), k


def _P(d, t):
    one = torch.full((d, d), 1.0 / d, dtype=F64)
    return one if t == "1" else torch.eye(d, dtype=F64) - one


def test_single_gradient_closed_forms_permutation():
    d0, d1, d2, d3 = 3, 4, 5, 2
    model = tiny((d0, d1, d2, d3), bias=False)
    s = build_structure(chain_of(model), "permutation")
    g = random_grad(model)
    g1, g2, g3 = g["1.weight"], g["3.weight"], g["5.weight"]
    f = single_gradient_factors(s, g).blocks()
    dim = {"1": lambda d: 1, "p": lambda d: d - 1}
    # one permuted side: C_1 = (P_1 g)^T (P_1 g), C_perp = (P_perp g)^T (P_perp g) / (m - 1)
    assert torch.allclose(f["Phi_1[11]"], (_P(d1, "1") @ g1).T @ (_P(d1, "1") @ g1))
    assert torch.allclose(f["Phi_1[p1]"], (_P(d1, "p") @ g1).T @ (_P(d1, "p") @ g1) / (d1 - 1))
    assert torch.allclose(f["Phi_3[11]"], (g3 @ _P(d2, "1")) @ (g3 @ _P(d2, "1")).T)
    assert torch.allclose(f["Phi_3[1p]"], (g3 @ _P(d2, "p")) @ (g3 @ _P(d2, "p")).T / (d2 - 1))
    # hidden-to-hidden: four scalars lambda_ts = ||P_t g P_s||^2 / dim_ts (code: h_1 then h_2)
    for c1, c2 in itertools.product("1p", repeat=2):
        lam = (_P(d2, c2) @ g2 @ _P(d1, c1)).pow(2).sum() / (dim[c2](d2) * dim[c1](d1))
        assert torch.allclose(f[f"phi_2[{c1}{c2}]"], lam), (c1, c2)
    # a cross-layer all-ones term: W_1 and W_3 through the mean of each hidden layer
    cross = torch.outer(g1.sum(0), g3.sum(1)) / math.sqrt(d1 * d2)
    assert torch.allclose(f["Psi_1_3[11]"], cross)
    assert "Psi_1_3[p1]" not in f  # W_3 has no h_1 axis: it only meets W_1 through the all-ones parts


@pytest.mark.parametrize("symmetry", ["orthogonal", "signed-permutation", "permutation", "none"])
@pytest.mark.parametrize("widths,bias", [((2, 3, 2), True), ((3, 2, 3, 2), False)])
def test_matrix_function_matches_dense(widths, bias, symmetry):
    model = tiny(widths, bias)
    s = build_structure(chain_of(model), symmetry)
    factors = project_dense(s, random_psd(s.num_params, seed=5))
    R = factors.dense()
    evals, evecs = torch.linalg.eigh(R)
    g = random_grad(model, seed=6)
    gv = flat(model, g)
    for fn in (inverse_sqrt(1e-3), torch.exp, lambda x: x):
        dense = evecs @ (fn(evals) * (evecs.T @ gv))
        cheap = flat(model, factors.apply(g, fn))
        assert torch.allclose(cheap, dense, atol=1e-9 * dense.abs().max()), symmetry


def _problem(model, n=10, d_out=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model[1].in_features, generator=gen, dtype=F64)
    y = torch.arange(n) % d_out
    return make_problem(model, x, y, loss="ce", device="cpu", dtype="float64")


@pytest.mark.parametrize("bias", [False, True])
def test_two_layer_symo_step_is_the_dense_inverse_square_root(bias):
    widths, eps = (3, 3, 2), 1e-4
    model = tiny(widths, bias=bias)
    problem = _problem(model)
    u = symo_direction(problem, eps=eps)
    g = problem.gradient()
    gv = flat(model, g)
    Gs = [group_matrix(model, widths, Vs) for Vs in hidden_groups(widths, "signed")]
    sigma = brute_force_R(Gs, torch.outer(gv, gv))
    evals, evecs = torch.linalg.eigh(sigma)
    dense = evecs @ ((evals.clamp_min(0) + eps).rsqrt() * (evecs.T @ gv))
    assert torch.allclose(flat(model, u), dense, atol=1e-8 * dense.abs().max())
    if bias:
        return
    # the slides' block formula, N = (M + eps I)^{-1/2} with M = [[Phi_1, Psi_1], [Psi_1^T, Phi_2]]:
    # dW_1 = g_1 N_11 + g_2^T N_21, dW_2 = N_12^T g_1^T + N_22 g_2  (it agrees with the dense step)
    g1, g2 = g["1.weight"], g["3.weight"]
    d0, d1 = widths[0], widths[1]
    M = torch.cat([torch.cat([g1.T @ g1, g1.T @ g2.T], 1), torch.cat([g2 @ g1, g2 @ g2.T], 1)]) / d1
    ev, U = torch.linalg.eigh(M)
    Nm = (U * (ev.clamp_min(0) + eps).rsqrt()) @ U.T
    N11, N12, N21, N22 = Nm[:d0, :d0], Nm[:d0, d0:], Nm[d0:, :d0], Nm[d0:, d0:]
    slides = {"1.weight": g1 @ N11 + g2.T @ N21, "3.weight": N12.T @ g1.T + N22 @ g2}
    assert torch.allclose(flat(model, slides), dense, atol=1e-8 * dense.abs().max())
    # eps -> 0: sqrt(d_1) polar([g_1, g_2^T]), a joint Muon step
    u0 = symo_direction(problem, eps=1e-13)
    Uz, _, Vh = torch.linalg.svd(torch.cat([g1, g2.T], 1), full_matrices=False)
    polar = math.sqrt(d1) * Uz @ Vh
    assert torch.allclose(torch.cat([u0["1.weight"], u0["3.weight"].T], 1), polar, atol=1e-4)


def test_deeper_symo_step_and_zeros_outside_the_chain():
    widths, eps = (2, 2, 3, 2), 1e-3
    model = tiny(widths)
    problem = _problem(model)
    u = symo_direction(problem, layers="1,3,5", symmetry="permutation", eps=eps)
    gv = flat(model, problem.gradient())
    Gs = [group_matrix(model, widths, Vs) for Vs in hidden_groups(widths, "permutation")]
    evals, evecs = torch.linalg.eigh(brute_force_R(Gs, torch.outer(gv, gv)))
    dense = evecs @ ((evals.clamp_min(0) + eps).rsqrt() * (evecs.T @ gv))
    assert torch.allclose(flat(model, u), dense, atol=1e-8 * dense.abs().max())
    # a chain of the first two layers only: the last layer's direction is zero
    part = symo_direction(problem, layers=["1", "3"], eps=eps)
    assert set(part) == set(problem.params)
    assert part["5.weight"].abs().max() == 0 and part["5.bias"].abs().max() == 0
    assert part["1.weight"].abs().max() > 0


def test_none_is_the_dense_second_moment_and_capped():
    model = tiny((2, 3, 2))
    s = build_structure(chain_of(model), "none")
    g = random_grad(model)
    gv = flat(model, g)
    f = single_gradient_factors(s, g)
    assert torch.allclose(f.blocks()["Sigma"], torch.outer(gv, gv))
    assert torch.allclose(f.dense(), torch.outer(gv, gv))
    big = mlp(64, [64], 10)
    with pytest.raises(CurvscopeError, match="cap"):
        build_structure(find_chain(big, dict(big.named_parameters())), "none")
    assert sum(p.numel() for p in big.parameters()) > DENSE_CAP


def per_sample_brute_force(problem):
    """Per-sample gradients one sample at a time (no vmap)."""
    out = []
    for n in range(problem.batch_size):
        p = problem.with_batch(problem.inputs[n:n + 1], problem.targets[n:n + 1])
        out.append(flat(problem.model, p.gradient()))
    return torch.stack(out)


@pytest.mark.parametrize("symmetry,kind", [("orthogonal", "signed"), ("permutation", "permutation")])
def test_per_sample_source_and_structure_error(symmetry, kind):
    widths = (2, 3, 2)
    model = tiny(widths)
    problem = _problem(model, n=7)
    res = compute_factors(problem, symmetry=symmetry, source="per-sample")
    V = per_sample_brute_force(problem)
    S = V.T @ V / V.shape[0]
    Gs = [group_matrix(model, widths, Vs) for Vs in hidden_groups(widths, kind)]
    RS = brute_force_R(Gs, S)
    assert torch.allclose(res.factors.dense(), RS, atol=1e-10)
    assert res.num_vectors == 7
    assert res.structure_error["per_sample"] == pytest.approx(float((S - RS).norm() / S.norm()), rel=1e-8)
    batch = compute_factors(problem, symmetry=symmetry, source="batch", structure_check=False)
    gv = flat(model, problem.gradient())
    assert torch.allclose(batch.factors.dense(), brute_force_R(Gs, torch.outer(gv, gv)), atol=1e-10)
    assert batch.structure_error == {}


def dense_ggn(problem):
    """G = (1/N) sum_n J_n^T H_n J_n over all parameters, from jacrev and the autograd loss Hessian."""
    names = expected_names(problem.model)

    def f(vec, x):
        return problem.forward(unflat(problem.model, vec), x.unsqueeze(0))[0]

    theta = flat(problem.model, problem.params)
    G = torch.zeros(theta.numel(), theta.numel(), dtype=F64)
    for n in range(problem.batch_size):
        J = torch.func.jacrev(f)(theta, problem.inputs[n])
        out = f(theta, problem.inputs[n])
        y = problem.targets[n:n + 1]
        H = torch.func.hessian(lambda o, y=y: problem.loss.per_sample(o.unsqueeze(0), y)[0])(out)
        G += J.T @ H @ J
    assert len(names) == len(problem.params)
    return G / problem.batch_size


def test_ggn_source():
    pytest.importorskip("curvscope.curvature.gram")
    widths = (2, 3, 2)
    model = tiny(widths)
    problem = _problem(model, n=5)
    res = compute_factors(problem, symmetry="orthogonal", source="ggn")
    G = dense_ggn(problem)
    Gs = [group_matrix(model, widths, Vs) for Vs in hidden_groups(widths, "signed")]
    RG = brute_force_R(Gs, G)
    assert torch.allclose(res.factors.dense(), RG, atol=1e-10)
    assert res.structure_error["ggn"] == pytest.approx(float((G - RG).norm() / G.norm()), rel=1e-7)


def test_outer_sum_is_a_sum_of_single_factors():
    model = tiny((2, 3, 2))
    s = build_structure(chain_of(model), "permutation")
    vs = [random_grad(model, seed=k) for k in range(3)]
    stacked = {n: torch.stack([v[n] for v in vs]) for n in vs[0]}
    total = outer_sum_factors(s, stacked, 0.5)
    batched = single_gradient_factors(s, stacked)  # a leading batch dimension: one set per vector
    for C, B in zip(total.matrices, batched.matrices, strict=True):
        assert torch.allclose(C, 0.5 * B.sum(0))


def test_line_search_prediction_uses_the_hessian():
    model = tiny((2, 3, 2))
    problem = _problem(model)
    u = {n: torch.randn_like(p) for n, p in problem.params.items()}
    res = line_search(problem, u, eps=1.0, steps=[1e-4, 1e-3])
    theta = flat(model, problem.params)
    uv = flat(model, u)
    H = torch.func.hessian(lambda v: problem.loss_value(unflat(model, v)))(theta)
    g = flat(model, problem.gradient())
    assert res.curvature == pytest.approx(float(uv @ H @ uv), rel=1e-8)
    assert res.g_dot_u == pytest.approx(float(g @ uv), rel=1e-10)
    # at a small step the quadratic model is accurate to third order
    assert float(res.realized[0]) == pytest.approx(float(res.predicted[0]), rel=1e-3)


def test_find_chain():
    from curvscope.models import transformer

    for act, group in (("tanh", "signed-permutation"), ("relu", "permutation"), ("identity", "orthogonal")):
        m = mlp(64, [64, 64], 10, activation=act)
        chain = find_chain(m, dict(m.named_parameters()))
        assert chain.modules == ("1", "3", "5") and chain.widths == (64, 64, 64, 10)
        assert chain.activation_symmetry == group
    t = transformer()
    params = dict(t.named_parameters())
    with pytest.raises(CurvscopeError, match="--layers"), as_flags():  # the engine names the option, the CLI its flag
        find_chain(t, params)
    chain = find_chain(t, params, ["blocks.0.mlp.0", "blocks.0.mlp.2"])
    assert chain.widths == (32, 64, 32) and chain.activation_symmetry is None
    for layers, needle in ((["blocks.0.norm1"], "not Linear"), (["nope"], "no module"),
                           (["blocks.0.mlp.0", "head"], "do not form a chain")):
        with pytest.raises(CurvscopeError, match=needle):
            find_chain(t, params, layers)
    odd = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(CurvscopeError, match="LayerNorm"):
        find_chain(odd, dict(odd.named_parameters()))
    with pytest.raises(CurvscopeError, match="hidden layer"):
        single = nn.Sequential(nn.Linear(3, 2))
        build_structure(find_chain(single, dict(single.named_parameters())), "orthogonal")
