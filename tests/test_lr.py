"""The lr engine (``curvscope.curvature.lr``) and its workflow (``curvscope.workflows.lr``) against brute force
on tiny float64 problems.

References: ``torch.func.hessian`` of ``phi(eta) = L(theta - sum_s eta_s u_s)`` w.r.t. eta (H-bar, g-hat), the
dense GGN ``J^T H J / N`` from ``torch.func.jacrev`` (GGN variant, stability bounds), the dense third
derivative of L in theta (order-3 diagonal), scipy's minimizer (cubic rates), and plain loss evaluation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacfwd, jacrev

from curvscope.cli.common import as_flags
from curvscope.curvature import lr as L
from curvscope.curvature.gram import rows as generic
from curvscope.curvature.lr import rules
from curvscope.errors import CurvscopeError
from curvscope.problem import make_problem
from curvscope.workflows.lr import LrOptions, suggest_lr


@pytest.fixture(autouse=True)
def float64_default():
    """Every tensor of this module in float64 (restored afterwards for the other test modules)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# -- tiny problems --------------------------------------------------------------------------------------------

def tiny_problem(loss: str = "ce", n: int = 7, seed: int = 0, hidden: int = 4, dataset: bool = False,
                 shuffle: bool = False):
    """A 3 -> hidden -> 3 tanh MLP (two Linear layers, four tensors), float64."""
    from curvscope.models import mlp

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(3, [hidden], 3, activation="tanh")
    x = torch.randn(n, 3, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if loss == "ce" else torch.randn(n, 3, generator=g)
    return make_problem(model, x, y, loss=loss, device="cpu", dtype="float64")


def dataset_problem(total: int, batch: int, shuffle: bool = False, seed: int = 0):
    """A tiny problem whose batch comes from a dataset of ``total`` samples, as load_problem builds it."""
    from curvscope.io.data import select_batch
    from curvscope.models import mlp

    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = mlp(3, [4], 3, activation="tanh")
    x = torch.randn(total, 3, generator=g)
    y = torch.randint(0, 3, (total,), generator=g)
    idx = select_batch(total, batch, shuffle=shuffle, seed=seed)
    return make_problem(model, x[idx], y[idx], loss="ce", device="cpu", dtype="float64",
                        info={"batch_indices": idx.tolist(), "shuffle": shuffle, "seed": seed}, dataset=(x, y))


def random_direction(problem, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in problem.params.items()}


TORCH_LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
"""PyTorch's own losses (reduction="mean"): the references, independent of curvscope's loss code."""


def torch_loss(problem) -> nn.Module:
    """PyTorch's module of the problem's loss, by its name."""
    return TORCH_LOSSES[problem.loss.name]()


def phi(problem, direction, groups):
    """eta (S,) -> L(theta - sum_s eta_s u_s), written independently of the engine."""
    def f(eta):
        params = {}
        for s, group in enumerate(groups):
            for name in group.param_names:
                params[name] = problem.params[name] - eta[s] * direction[name]
        out = functional_call(problem.model, {**problem.buffers, **params}, (problem.inputs,))
        return torch_loss(problem)(out, problem.targets)
    return f


def flat_tools(problem):
    """Flatten / unflatten helpers and the group-restricted direction matrix U (D, S)."""
    names = list(problem.params)
    shapes = [problem.params[n].shape for n in names]
    sizes = [problem.params[n].numel() for n in names]

    def unflat(v):
        return {n: t.reshape(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}

    def flat(d):
        return torch.cat([d[n].reshape(-1) for n in names])

    def direction_matrix(direction, groups):
        cols = []
        for group in groups:
            cols.append(flat({n: direction[n] if n in group.param_names else torch.zeros_like(direction[n])
                              for n in names}))
        return torch.stack(cols, dim=1)

    return names, flat, unflat, direction_matrix


def dense_ggn(problem):
    """G = (1/N) sum_n J_n^T H_n J_n (D, D) with J from jacrev and H_n from torch.func.hessian of the loss."""
    names, flat, unflat, _ = flat_tools(problem)
    theta = flat(problem.params)
    N, C = problem.batch_size, problem.num_outputs

    def outputs(v):
        return functional_call(problem.model, {**problem.buffers, **unflat(v)}, (problem.inputs,))

    J = jacrev(outputs)(theta).reshape(N, C, -1)  # (N, C, D)
    module = torch_loss(problem)
    out = outputs(theta).detach()
    H = torch.stack([hessian(lambda f, n=n: module(f.unsqueeze(0), problem.targets[n:n + 1]))(out[n])
                     for n in range(N)])  # (N, C, C): Hessian of l_n
    return torch.einsum("ncd,nce,nef->df", J, H, J) / N


# -- H-bar and g-hat ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("partition", ["layer", "tensor", "all"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_g_hat_and_h_bar_equal_hessian_of_reduced_loss(partition, loss):
    problem = tiny_problem(loss)
    groups = problem.groups(partition)
    for direction in (problem.gradient(), random_direction(problem)):
        f = phi(problem, direction, groups)
        eta0 = torch.zeros(len(groups))
        expected_h = hessian(f)(eta0)
        expected_g = -torch.func.grad(f)(eta0)
        g_hat = L.reduced_gradient(problem.gradient(), direction, groups)
        h_bar = L.reduced_hessian(problem, direction, groups, "hessian")
        torch.testing.assert_close(g_hat, expected_g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h_bar, expected_h, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_h_bar_equals_dense_ggn(loss):
    problem = tiny_problem(loss)
    groups = problem.groups("tensor")
    _, _, _, direction_matrix = flat_tools(problem)
    G = dense_ggn(problem)
    for direction in (problem.gradient(), random_direction(problem)):
        U = direction_matrix(direction, groups)
        h_bar = L.reduced_hessian(problem, direction, groups, "ggn")
        torch.testing.assert_close(h_bar, U.T @ G @ U, rtol=1e-9, atol=1e-12)
        assert torch.linalg.eigvalsh(h_bar).min() >= -1e-12  # the GGN variant is PSD


def test_loop_fallback_when_vmap_fails(monkeypatch):
    problem = tiny_problem("ce")
    groups = problem.groups("tensor")
    direction = random_direction(problem)
    batched = [L.reduced_hessian(problem, direction, groups, c) for c in ("hessian", "ggn")]
    batched.append(L.third_order_diagonal(problem, direction, groups))

    def no_vmap(fn):
        def refuse(*args):
            raise RuntimeError("vmap: unsupported op")
        return refuse

    assert problem.path == "vmap"
    monkeypatch.setattr(generic, "vmap", no_vmap)
    looped = [L.reduced_hessian(problem, direction, groups, c) for c in ("hessian", "ggn")]
    looped.append(L.third_order_diagonal(problem, direction, groups))
    assert problem.path == "autograd (vmap failed: vmap: unsupported op)"
    for a, b in zip(batched, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_unknown_curvature_is_a_clean_error():
    problem = tiny_problem()
    with pytest.raises(CurvscopeError, match="^curvature 'fisher': choose one of hessian, ggn"):  # the engine's words
        L.reduced_hessian(problem, problem.gradient(), problem.groups("layer"), "fisher")
    with pytest.raises(CurvscopeError, match="--curvature 'fisher': choose one of hessian, ggn"), as_flags():
        LrOptions(curvature="fisher").validate()  # the CLI checks the option before anything runs


# -- order 3 -----------------------------------------------------------------------------------------------------

def test_third_order_diagonal_equals_dense_third_derivative():
    problem = tiny_problem("ce", n=5, hidden=3)
    groups = problem.groups("tensor")
    names, flat, unflat, direction_matrix = flat_tools(problem)

    def loss_flat(v):
        out = functional_call(problem.model, {**problem.buffers, **unflat(v)}, (problem.inputs,))
        return torch_loss(problem)(out, problem.targets)

    T = jacfwd(jacfwd(jacrev(loss_flat)))(flat(problem.params))  # (D, D, D)
    direction = random_direction(problem)
    U = direction_matrix(direction, groups)
    expected = -torch.einsum("ijk,is,js,ks->s", T, U, U, U)  # d^3/d eta_s^3 of L(theta - eta_s u_s)
    torch.testing.assert_close(L.third_order_diagonal(problem, direction, groups), expected, rtol=1e-8,
                               atol=1e-12)


def test_cubic_rates_minimize_the_cubic_model():
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    for pd in (True, False):
        A = torch.randn(4, 4, generator=g)
        H = A @ A.T / 4 + (0.1 if pd else -1.0) * torch.eye(4)
        g_hat = torch.rand(4, generator=g) + 0.1
        d3 = torch.randn(4, generator=g)
        eta, note = L.cubic_rates(g_hat, H, d3, weight=2.0)
        assert note == "ok"

        def m(e, H=H, g_hat=g_hat, d3=d3):
            return L.cubic_model(torch.tensor(e), g_hat, H, d3, 2.0)

        starts = [torch.zeros(4), torch.randn(4, generator=g), 3 * torch.randn(4, generator=g)]
        best = min((optimize.minimize(m, s.numpy(), method="BFGS", options={"gtol": 1e-12}) for s in starts),
                   key=lambda r: r.fun)
        value = L.cubic_model(eta, g_hat, H, d3, 2.0)
        grad = -g_hat + H @ eta + 0.5 * 2.0 * d3.abs() * eta.abs() * eta
        assert grad.abs().max() < 1e-9 and value < 0
        if pd:  # convex: the unique minimizer
            torch.testing.assert_close(eta, torch.tensor(best.x), rtol=1e-5, atol=1e-7)
            assert value == pytest.approx(best.fun, rel=1e-8)
        else:  # nonconvex: a local minimizer (model Hessian PSD there), bounded below
            assert torch.linalg.eigvalsh(H + torch.diag(2.0 * d3.abs() * eta.abs())).min() > -1e-10
            assert math.isfinite(best.fun)


def test_cubic_rates_refuse_an_unbounded_model():
    H = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    eta, note = L.cubic_rates(torch.tensor([1.0, 1.0]), H, torch.tensor([1.0, 0.0]))
    assert eta is None and "unbounded" in note


# -- rates --------------------------------------------------------------------------------------------------------

def test_newton_and_diagonal_rates():
    g_hat = torch.tensor([1.0, 2.0])
    h_bar = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    eta, note = L.newton_rates(g_hat, h_bar, ridge=0.5)
    torch.testing.assert_close(eta, torch.linalg.solve(h_bar + 0.5 * torch.eye(2), g_hat))
    assert note == "ok"
    # predicted decrease of the joint Newton step is g_hat^T eta / 2 (ridge 0)
    eta0, _ = L.newton_rates(g_hat, h_bar)
    assert L.predicted_decrease(eta0, g_hat, h_bar) == pytest.approx(0.5 * float(g_hat @ eta0), rel=1e-12)
    rates, notes = L.diagonal_rates(torch.tensor([1.0, 1.0, 0.0, -1.0]),
                                    torch.diag(torch.tensor([4.0, -1.0, 1.0, 1.0])))
    assert rates[0] == 0.25 and notes[0] == "ok"
    assert math.isnan(rates[1]) and "no finite Newton rate" in notes[1]
    assert math.isnan(rates[2]) and notes[2] == "zero gradient"
    assert math.isnan(rates[3]) and "not a descent direction" in notes[3]
    none, why = L.newton_rates(g_hat, torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    assert none is None and "not positive definite" in why
    none, why = L.newton_rates(g_hat, torch.zeros(2, 2))
    assert none is None and "singular" in why


@pytest.mark.parametrize("seed", range(20))
def test_recommended_rates_are_always_positive_and_finite(seed):
    g = torch.Generator().manual_seed(seed)
    S = 4
    g_hat = torch.randn(S, generator=g)
    g_hat[seed % S] = 0.0
    A = torch.randn(S, S, generator=g)
    h_bar = A @ A.T - (seed % 3) * torch.eye(S)
    newton, _ = L.newton_rates(g_hat, h_bar)
    lr_newton = torch.full((S,), math.nan) if newton is None else torch.where(newton > 0, newton, math.nan)
    lr_diag, notes = L.diagonal_rates(g_hat, h_bar)
    bounds = torch.rand(S, generator=g) * 2
    if seed % 2:
        bounds[0] = math.nan
    for stab, whole in ((bounds, 0.3), (torch.full((S,), math.nan), math.nan)):
        rates, rules = L.recommend_rates(g_hat, h_bar, lr_newton, lr_diag, notes, stab, whole)
        assert torch.isfinite(rates).all() and (rates > 0).all(), (rates, rules)
        assert len(rules) == S and all(rules)
        for s in range(S):
            if math.isfinite(float(stab[s])):
                assert rates[s] <= stab[s] * (1 + 1e-12)
            if notes[s] == "zero gradient":
                assert rules[s].startswith("zero gradient: fallback")


def test_recommend_prefers_newton_then_scaled_diag():
    g_hat = torch.tensor([1.0, 1.0])
    h_bar = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    newton, _ = L.newton_rates(g_hat, h_bar)
    diag, notes = L.diagonal_rates(g_hat, h_bar)
    none = torch.full((2,), math.nan)
    rates, rules = L.recommend_rates(g_hat, h_bar, newton, diag, notes, none, math.nan)
    assert rules == ["newton", "newton"]
    torch.testing.assert_close(rates, newton)
    # with a negative joint rate: diagonal rates scaled by the model's best common factor
    h_bar = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    g_hat = torch.tensor([1.0, 0.2])
    newton, _ = L.newton_rates(g_hat, h_bar)
    assert newton[1] < 0
    diag, notes = L.diagonal_rates(g_hat, h_bar)
    rates, rules = L.recommend_rates(g_hat, h_bar, torch.where(newton > 0, newton, math.nan), diag, notes,
                                     none, math.nan)
    t = float(diag @ g_hat / (diag @ h_bar @ diag))
    torch.testing.assert_close(rates, t * diag)
    assert all(r.startswith("diag x") for r in rules)
    # capped at the block bound
    rates, rules = L.recommend_rates(g_hat, h_bar, none, diag, notes, torch.tensor([0.01, 10.0]), 0.5)
    assert rates[0] == 0.01 and rules[0].endswith("stability-capped")


# -- whole batches: truth test, stability, special cases ---------------------------------------------------------

class Linear2(nn.Module):
    """A linear model with two parameter tensors in two modules (so layer groups are 2)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("partition", ["layer", "tensor", "all"])
def test_quadratic_problem_predicted_equals_realized(curvature, partition):
    torch.manual_seed(0)
    model = Linear2()
    g = torch.Generator().manual_seed(0)
    problem = make_problem(model, torch.randn(9, 3, generator=g), torch.randn(9, 2, generator=g), loss="mse",
                           device="cpu", dtype="float64")
    result = suggest_lr(problem, partition=partition, curvature=curvature, ridge=0.0)
    main = result.main
    assert set(main.steps) >= {"diag", "stability", "recommended"}
    for name, check in main.steps.items():
        assert check.realized == pytest.approx(check.predicted, rel=1e-9, abs=1e-13), name
    assert main.steps["recommended"].realized > 0


def test_stability_bounds_equal_dense_ggn_blocks():
    pytest.importorskip("curvscope.curvature.gram.spectrum")
    problem = tiny_problem("ce", n=6)
    G = dense_ggn(problem)
    names, _, _, _ = flat_tools(problem)
    sizes = [problem.params[n].numel() for n in names]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
    for partition in ("layer", "tensor"):
        groups = problem.groups(partition)
        lam, bound, lam_whole, bound_whole = L.stability_bounds(problem, partition, groups)
        for s, group in enumerate(groups):
            idx = torch.cat([torch.arange(offsets[n], offsets[n] + problem.params[n].numel())
                             for n in group.param_names])
            expected = float(torch.linalg.eigvalsh(G[idx][:, idx])[-1])
            assert float(lam[s]) == pytest.approx(expected, rel=1e-8)
            assert float(bound[s]) == pytest.approx(2 / expected, rel=1e-8)
        whole = float(torch.linalg.eigvalsh(G)[-1])
        assert lam_whole == pytest.approx(whole, rel=1e-8)
        assert bound_whole == pytest.approx(2 / whole, rel=1e-8)


def test_stability_bounds_of_a_language_model_by_lanczos_equal_the_gram(monkeypatch):
    """Beyond ``MAX_GRAM_COLUMNS`` (a vocabulary times tokens) the bounds come from Lanczos on GGN-vector
    products: on a causal LM with ignored tokens they equal the Gram engine's (which is tested against dense
    references), per layer and for the whole model."""
    from curvscope.curvature.lr import stability

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(7, 6), nn.Linear(6, 6), nn.Linear(6, 7)

        def forward(self, tokens):
            return self.head(torch.tanh(self.mix(self.emb(tokens))))

    torch.manual_seed(0)
    tokens = torch.randint(7, (3, 5), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[2, 3:] = -100
    problem = make_problem(TinyLM(), tokens, labels, loss="ce", dtype=torch.float64, shift_labels=True)
    groups = problem.groups("layer")
    gram = L.stability_bounds(problem, "layer", groups)
    monkeypatch.setattr(stability, "MAX_GRAM_COLUMNS", 0)
    lanczos = L.stability_bounds(problem, "layer", groups)
    torch.testing.assert_close(lanczos[0], gram[0], rtol=1e-6, atol=0)
    assert lanczos[2] == pytest.approx(gram[2], rel=1e-6)


def test_recommended_rates_decrease_the_loss_and_report_checks_by_hand():
    problem = tiny_problem("ce", n=8)
    result = suggest_lr(problem, partition="layer", curvature="hessian")
    main = result.main
    assert torch.isfinite(main.recommended).all() and (main.recommended > 0).all()
    # the realized decrease, recomputed by hand
    gradient = problem.gradient()
    params = dict(problem.params)
    for s, group in enumerate(result.groups):
        for n in group.param_names:
            params[n] = params[n] - float(main.recommended[s]) * gradient[n]
    before = float(torch_loss(problem)(problem.forward(), problem.targets))
    after = float(torch_loss(problem)(problem.forward(params), problem.targets))
    assert main.loss_before == pytest.approx(before, rel=1e-12)
    assert main.steps["recommended"].realized == pytest.approx(before - after, rel=1e-9)
    assert before - after > 0


def test_safeguard_halves_rates_until_the_batch_loss_decreases(monkeypatch):
    problem = tiny_problem("ce", n=8)

    def too_large(g_hat, *args):
        return torch.full_like(g_hat, 1e4), ["test rule"] * g_hat.shape[0]

    monkeypatch.setattr(rules, "recommend_rates", too_large)
    main = suggest_lr(problem, partition="layer", stability=False).main
    assert main.halvings > 0
    torch.testing.assert_close(main.recommended, torch.full_like(main.recommended, 1e4 / 2 ** main.halvings))
    assert all(rule == f"test rule, halved x{main.halvings} (loss check)" for rule in main.rules)
    assert main.steps["recommended"].realized > 0
    # one halving fewer would not have decreased the loss
    before = float(problem.loss_value())
    params = L.step_params(problem.params, problem.gradient(), problem.groups("layer"),
                           2 * main.recommended)
    assert float(problem.loss_value(params)) >= before


class CosModel(nn.Module):
    """f(x) = cos(a) x + b x: the group 'a' has negative curvature at a = 0.5 with targets below f."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5]))
        self.b = nn.Parameter(torch.tensor([0.3]))

    def forward(self, x):
        return torch.cos(self.a) * x + self.b * x


def test_non_positive_definite_h_bar_is_reported_and_rates_stay_finite():
    problem = make_problem(CosModel(), torch.ones(4, 1), -torch.ones(4, 1), loss="mse", device="cpu",
                           dtype="float64")
    result = suggest_lr(problem, partition="tensor", curvature="hessian")
    main = result.main
    assert main.h_bar[0, 0] < 0  # d^2 L / d eta_a^2 < 0
    assert not main.h_bar_positive_definite
    assert main.newton_eta is None and "not positive definite" in main.newton_note
    assert math.isnan(main.lr_diag[0]) and "no finite Newton rate" in main.diag_notes[0]
    assert torch.isfinite(main.recommended).all() and (main.recommended > 0).all()
    assert main.rules[0].startswith("no curvature")
    assert main.rules[1].startswith("diag")
    assert main.steps["recommended"].realized > 0
    # the GGN variant is PSD (here rank 1: one output depending on a and b through cos(a) + b) and gives
    # diagonal rates for both groups
    ggn = suggest_lr(problem, partition="tensor", curvature="ggn").main
    assert torch.linalg.eigvalsh(ggn.h_bar).min() > -1e-12 and torch.isfinite(ggn.lr_diag).all()
    assert ggn.newton_eta is None and "singular" in ggn.newton_note


def test_zero_gradient_gives_clear_finite_output():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model.double()(x)  # the model fits exactly: g = 0
    problem = make_problem(model, x, y, loss="mse", device="cpu", dtype="float64")
    assert all((t == 0).all() for t in problem.gradient().values())
    main = suggest_lr(problem, partition="tensor").main
    assert (main.g_hat == 0).all() and (main.h_bar == 0).all()
    assert main.newton_eta is None and main.newton_note == "no group moves"
    assert torch.isfinite(main.recommended).all() and (main.recommended > 0).all()
    assert all(rule.startswith("zero gradient: fallback to block stability bound") for rule in main.rules)
    # the block bounds, scaled by one common factor to the stability bound of per-group rates (#23)
    ratio = main.recommended / main.lr_stability
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    assert float(ratio[0]) <= 1 and main.joint_sharpness <= 2 * (1 + 1e-3)
    assert main.steps["recommended"].realized == 0 and main.steps["recommended"].predicted == 0
    assert main.halvings == 0


def test_numerically_zero_block_is_treated_as_zero_gradient():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.shift = nn.Linear(3, 1)  # softmax ignores a shift common to all logits

        def forward(self, x):
            return self.lin(x) + self.shift(x)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    problem = make_problem(Dead(), torch.randn(8, 3, generator=g), torch.arange(8) % 2, loss="ce",
                           device="cpu", dtype="float64")
    main = suggest_lr(problem, partition="layer").main
    assert math.isnan(main.lr_stability[1])
    assert main.rules[1].startswith("zero gradient") and "global stability bound" in main.rules[1]
    assert main.recommended[1] == pytest.approx(main.lr_stability_global)
    assert math.isfinite(main.recommended[0]) and main.recommended[0] > 0


# -- several batches and a holdout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_are_disjoint_and_statistics_match(shuffle):
    problem = dataset_problem(total=30, batch=6, shuffle=shuffle, seed=4)
    result = suggest_lr(problem, partition="layer", curvature="ggn", batches=3, holdout=5, stability=False)
    indices = [b.batch_indices for b in result.batches]
    assert indices[0] == problem.info["batch_indices"]
    flat = [i for idx in indices for i in idx]
    assert len(flat) == len(set(flat)) == 18
    for b, batch in enumerate(result.batches):
        single = suggest_lr(problem.batch_from_dataset(torch.tensor(indices[b])), curvature="ggn",
                              stability=False).main
        torch.testing.assert_close(batch.g_hat, single.g_hat)
        torch.testing.assert_close(batch.h_bar, single.h_bar)
    stats = result.statistics()
    values = torch.stack([b.lr_diag for b in result.batches])
    torch.testing.assert_close(stats["lr_diag"].mean, values.mean(0))
    torch.testing.assert_close(stats["lr_diag"].std, values.std(0))
    assert stats["lr_diag"].noisy == [bool(s > m) for s, m in zip(values.std(0), values.mean(0), strict=True)]
    # the holdout: 5 samples outside all batches, and the realized decrease on it by hand
    assert result.holdout_size == 5
    check = result.main.steps["recommended"]
    used = set(flat)
    from curvscope.io.data import select_batch
    order = select_batch(30, None, shuffle=shuffle, seed=4).tolist()
    held = torch.tensor([i for i in order if i not in used][:5])
    hp = problem.batch_from_dataset(held)
    gradient = problem.gradient()
    rate = {n: float(check.rates[s]) for s, g in enumerate(result.groups) for n in g.param_names}
    params = {n: p - rate[n] * gradient[n] for n, p in problem.params.items()}
    assert check.realized_holdout == pytest.approx(float(hp.loss_value()) - float(hp.loss_value(params)),
                                                   rel=1e-9)


def test_rate_stats_ignore_missing_values():
    stats = L.rate_stats(torch.tensor([[1.0, math.nan, 1.0], [3.0, 2.0, math.nan], [2.0, math.nan, math.nan]]))
    torch.testing.assert_close(stats.mean[:2], torch.tensor([2.0, 2.0]))
    assert stats.std[0] == pytest.approx(1.0) and math.isnan(stats.std[1])
    assert stats.count == [3, 1, 1] and stats.noisy == [False, False, False]
    noisy = L.rate_stats(torch.tensor([[0.1], [5.0], [0.1]]))
    assert noisy.noisy == [True]


def test_too_many_batches_or_bad_options_are_clean_errors():
    problem = dataset_problem(total=20, batch=6)
    with pytest.raises(CurvscopeError, match="needs 24 samples but the dataset has 20"), as_flags():
        suggest_lr(problem, batches=4, stability=False)
    with pytest.raises(CurvscopeError, match="holdout"), as_flags():
        suggest_lr(problem, holdout=-1, stability=False)
    with pytest.raises(CurvscopeError, match="--partition 'module'"), as_flags():
        suggest_lr(problem, partition="module", stability=False)
    with pytest.raises(CurvscopeError, match="--ridge must be a finite number >= 0"), as_flags():
        suggest_lr(problem, ridge=-1.0, stability=False)
    with pytest.raises(CurvscopeError, match="--batches must be an integer"), as_flags():
        suggest_lr(problem, batches="2", stability=False)
    with pytest.raises(CurvscopeError, match="data file"), as_flags():
        suggest_lr(tiny_problem(), batches=2, stability=False)


def test_symo_direction_is_used_when_available():
    pytest.importorskip("curvscope.curvature.symmetry")
    problem = tiny_problem("ce", n=8)
    from curvscope.curvature.symmetry import symo_direction

    u = symo_direction(problem, eps=1e-8)
    groups = problem.groups("layer")
    main = suggest_lr(problem, direction="symo", partition="layer").main
    f = phi(problem, u, groups)
    torch.testing.assert_close(main.h_bar, hessian(f)(torch.zeros(len(groups))), rtol=1e-9, atol=1e-12)
    assert "stability" not in main.steps  # GD bounds do not apply along another direction
    assert torch.isfinite(main.recommended).all() and (main.recommended > 0).all()
