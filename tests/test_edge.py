"""Stability thresholds and Adam's preconditioner (curvscope.curvature.edge, docs/conventions.md §10): against
hand-derived values, against the real torch.optim optimizers on quadratics (divergence just above the threshold,
convergence just below), against torch's own Adam update, and against dense float64 Hessians."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvscope.curvature.edge import (
    NoPreconditioner,
    OptimizerInfo,
    adam_preconditioner,
    compared_operator,
    compared_preconditioner,
    compared_sharpness,
    decay_shift,
    flat_diagonal,
    needs_preconditioner,
    optimizer_info,
    preconditioned_operator,
    sharpness_ratio,
    threshold,
)
from curvscope.curvature.matfree import extreme_eigenpairs, hessian_operator
from curvscope.errors import CurvscopeError, OptionError
from curvscope.problem import make_problem

# -- thresholds by hand -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("info", "expected"), [
    (OptimizerInfo("sgd", lr=0.1), 20.0),
    (OptimizerInfo("sgd", lr=0.1, dampening=0.5), 20.0),  # dampening does nothing without momentum
    (OptimizerInfo("sgd", lr=0.1, momentum=0.9), 38.0),
    (OptimizerInfo("sgd", lr=0.1, momentum=0.9, dampening=0.5), 76.0),
    (OptimizerInfo("sgd", lr=0.1, momentum=0.9, nesterov=True), 3.8 / 0.28),
    (OptimizerInfo("adam", lr=1e-3, betas=(0.9, 0.999)), 38_000.0),
    (OptimizerInfo("adamw", lr=1e-3, betas=(0.5, 0.999), weight_decay=0.1), 6_000.0),
])
def test_thresholds_by_hand(info, expected):
    value, note = threshold(info)
    assert value == pytest.approx(expected, rel=1e-12)
    assert "lr" in note


@pytest.mark.parametrize(("info", "needle"), [
    (OptimizerInfo(None, lr=0.1, notes=("optimizer not recognized",)), "not recognized"),
    (OptimizerInfo("sgd", lr=None), "no learning rate"),
    (OptimizerInfo("sgd", lr=0.0), "lr is 0"),
    (OptimizerInfo("sgd", lr=0.1, maximize=True), "maximize"),
    (OptimizerInfo("sgd", lr=0.1, momentum=0.9, dampening=1.0), "dampening 1"),
    (OptimizerInfo("sgd", lr=0.1, momentum=1.0), "momentum 1 >= 1"),
])
def test_no_threshold_where_the_convention_defines_none(info, needle):
    value, note = threshold(info)
    assert value is None and needle in note


def test_hand_built_info_is_checked():
    with pytest.raises(OptionError, match="lr"):
        OptimizerInfo("sgd", lr=-1.0)
    with pytest.raises(OptionError, match="betas"):
        OptimizerInfo("adam", lr=0.1)
    with pytest.raises(OptionError, match="kind"):
        OptimizerInfo("lion", lr=0.1)


def test_compared_sharpness_weight_decay_and_ratio():
    sgd = OptimizerInfo("sgd", lr=0.1, weight_decay=0.5)
    assert compared_sharpness(10.0, sgd) == (10.5, pytest.approx(compared_sharpness(10.0, sgd)[1]))
    assert "weight_decay 0.5" in compared_sharpness(10.0, sgd)[1]
    assert compared_sharpness(10.0, OptimizerInfo("sgd", lr=0.1))[0] == 10.0
    adam = OptimizerInfo("adam", lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    value, note = compared_sharpness(10.0, adam)
    assert value is None and "optimizer state" in note
    value, note = compared_sharpness(10.0, adam, preconditioned=True)
    assert value == 10.0 and "coupled weight decay W inside" in note
    adamw = OptimizerInfo("adamw", lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    assert "AdamW's decoupled" in compared_sharpness(10.0, adamw, preconditioned=True)[1]
    assert decay_shift(adamw, ["w"]) is None and decay_shift(adam, ["w"]) == {"w": 0.5}
    assert sharpness_ratio(19.0, 20.0) == pytest.approx(0.95)
    assert sharpness_ratio(None, 20.0) is None and sharpness_ratio(1.0, None) is None


# -- thresholds against the real optimizers on a quadratic ------------------------------------------------

def _quadratic(lam: float) -> torch.Tensor:
    """A 2x2 Hessian with eigenvalues lam and lam / 3, rotated off the axes."""
    c, s = math.cos(0.4), math.sin(0.4)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rotation @ torch.diag(torch.tensor([lam, lam / 3], dtype=torch.float64)) @ rotation.T


def _growth(make_optimizer, hessian: torch.Tensor, steps: int, x0: float = 1.0) -> float:
    """‖x_T‖ / ‖x_0‖ for L(x) = x^T H x / 2 under a real torch optimizer (stops once it exceeds 1e6)."""
    x = torch.tensor([x0, x0], dtype=torch.float64, requires_grad=True)
    start = float(x.detach().norm())
    opt = make_optimizer([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x @ hessian @ x).backward()
        opt.step()
        if float(x.detach().norm()) > 1e6 * start:
            break
    return float(x.detach().norm()) / start


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.5, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.7),
    dict(lr=0.05, momentum=0.8, weight_decay=2.0),
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sgd_diverges_just_above_the_threshold_and_converges_just_below(kwargs):
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    info = optimizer_info(torch.optim.SGD([x], **kwargs).state_dict(), ["x"], {"x": (2,)})
    limit, _ = threshold(info)
    for factor, diverges in ((1.03, True), (0.97, False)):
        # choose lambda_max so that the compared sharpness (lambda_max + coupled decay) is factor * threshold
        lam = factor * limit - kwargs.get("weight_decay", 0.0)
        compared, _ = compared_sharpness(lam, info)
        assert sharpness_ratio(compared, limit) == pytest.approx(factor)
        growth = _growth(lambda p: torch.optim.SGD(p, **kwargs), _quadratic(lam), steps=400)
        assert (growth > 1e3) if diverges else (growth < 1e-3), (factor, growth)


@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.Adam, dict(lr=0.01, eps=1.0)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1.0)),
    (torch.optim.Adam, dict(lr=0.01, eps=1.0, weight_decay=30.0)),  # coupled: inside the compared operator
    (torch.optim.AdamW, dict(lr=0.01, eps=1.0, weight_decay=0.01)),  # decoupled: H as it is
])
def test_adam_with_a_frozen_preconditioner_follows_its_threshold(cls, kwargs):
    """torch's Adam with its preconditioner frozen: 300 steps at the minimum (zero gradients: v = 0, and
    1 - beta1^t = 1 to 1e-13) leave P = eps (1 - beta1^t); from tiny iterates sqrt(v) stays far below eps = 1.
    The compared sharpness from that real state predicts divergence and convergence from there on."""
    for factor, diverges in ((1.03, True), (0.97, False)):
        x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = cls([x], **kwargs)
        limit, _ = threshold(optimizer_info(opt.state_dict(), ["x"], {"x": (2,)}))
        w = 0.0 if cls is torch.optim.AdamW else kwargs.get("weight_decay", 0.0)
        hessian = _quadratic(factor * limit - w)  # P = 1: the compared sharpness is lambda_max(H) + w
        for _ in range(300):
            opt.zero_grad()
            (0.5 * x @ hessian @ x).backward()
            opt.step()
        state = opt.state_dict()
        info = optimizer_info(state, ["x"], {"x": (2,)})
        op = compared_operator(hessian, state, info, {"x": (2,)}, ["x"])
        compared, note = compared_sharpness(float(torch.linalg.eigvalsh(op.dense()).max()), info,
                                            preconditioned=True)
        assert sharpness_ratio(compared, limit) == pytest.approx(factor, rel=1e-9)
        with torch.no_grad():
            x.fill_(1e-9)
        start = float(x.detach().norm())
        for _ in range(600):
            opt.zero_grad()
            (0.5 * x @ hessian @ x).backward()
            opt.step()
            if float(x.detach().norm()) > 1e3 * start:
                break
        growth = float(x.detach().norm()) / start
        assert (growth > 1e3) if diverges else (growth < 1e-3), (factor, growth)


def test_sgd_with_two_param_groups_of_different_learning_rates_follows_the_folded_threshold():
    """Per-group learning rates: the threshold of the largest rate against the sharpness with each group's
    rate folded into P; the coupled 2x2 system diverges just above it and converges just below."""
    base = torch.tensor([[3.0, 1.2], [1.2, 1.0]], dtype=torch.float64)

    def make(params, momentum=0.5):
        a, b = params if len(params) == 2 else (params[0], params[1])
        return torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02}], momentum=momentum)

    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    shapes = {"a": (), "b": ()}
    info = optimizer_info(make([a, b]).state_dict(), ["a", "b"], shapes)
    assert info.group_lrs == (0.1, 0.02) and info.lr == 0.1 and needs_preconditioner(info)
    limit, note = threshold(info)
    assert limit == pytest.approx(3.0 / 0.1) and "different lrs" in note
    p = compared_preconditioner(None, info, ["a", "b"])
    assert float(p["a"]) == 1.0 and float(p["b"]) == pytest.approx(5.0)
    op = compared_operator(base, None, info, shapes, ["a", "b"])
    sharp = float(torch.linalg.eigvalsh(op.dense()).max())
    # the same number from the lr-weighted matrix D^1/2 H D^1/2 / lr_max
    d = torch.tensor([0.1, 0.02], dtype=torch.float64).sqrt()
    assert sharp == pytest.approx(float(torch.linalg.eigvalsh(d[:, None] * base * d[None, :]).max()) / 0.1)
    for factor, diverges in ((1.03, True), (0.97, False)):
        hessian = base * (factor * limit / sharp)
        x = [torch.ones((), dtype=torch.float64, requires_grad=True) for _ in range(2)]
        opt = make(x)
        for _ in range(600):
            opt.zero_grad()
            z = torch.stack(x)
            (0.5 * z @ hessian @ z).backward()
            opt.step()
        growth = float(torch.stack(x).detach().norm()) / math.sqrt(2)
        assert (growth > 1e3) if diverges else (growth < 1e-3), (factor, growth)
    value, note = compared_sharpness(sharp, info)
    assert value is None and "folded in" in note


# -- optimizer_info on real state dicts -------------------------------------------------------------------

def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _trained(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt.state_dict()


def _names_shapes(model: nn.Module) -> tuple[list[str], dict[str, torch.Size]]:
    named = dict(model.named_parameters())
    return list(named), {n: p.shape for n, p in named.items()}


@pytest.mark.parametrize(("make", "kind", "expected"), [
    (lambda p: torch.optim.SGD(p, lr=0.1), "sgd", 20.0),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), "sgd", 3.8 / 0.28),
    (lambda p: torch.optim.Adam(p, lr=1e-3), "adam", 38_000.0),
    (lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, weight_decay=0.1), "adam", 38_000.0),
    (lambda p: torch.optim.AdamW(p, lr=2e-3, betas=(0.8, 0.99)), "adamw", 3.6 / 0.2 / 2e-3),
])
def test_optimizer_info_from_real_state_dicts(make, kind, expected):
    model = _mlp()
    opt = make(model.parameters())
    state = _trained(model, opt)
    names, shapes = _names_shapes(model)
    info = optimizer_info(state, names, shapes)
    assert info.kind == kind and info.group_lrs is None and info.differing == ()
    assert dict(info.param_ids) == {n: i for i, n in enumerate(names)}
    group = opt.param_groups[0]
    assert info.lr == group["lr"] and info.weight_decay == group["weight_decay"]
    if kind == "sgd":
        assert (info.momentum, info.nesterov, info.dampening) == (group["momentum"], group["nesterov"], 0.0)
    else:
        assert info.betas == tuple(group["betas"]) and info.eps == group["eps"]
        assert info.amsgrad == group["amsgrad"]
    assert threshold(info)[0] == pytest.approx(expected)


def test_two_param_groups_in_named_parameters_order_and_in_trainer_order():
    model = _mlp()
    names, shapes = _names_shapes(model)
    # per-layer learning rates: contiguous slices of named_parameters()
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-3},
                            {"params": model[2].parameters(), "lr": 1e-4}])
    info = optimizer_info(_trained(model, opt), names, shapes)
    assert info.group_lrs == (1e-3, 1e-4) and info.lr == 1e-3 and info.differing == ("lr",)
    assert info.group_of("2.bias").lr == 1e-4 and info.notes == ()
    # Hugging Face's Trainer: decayed weights first, then biases without decay (out of named_parameters order)
    model = _mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.01}, {"params": biases, "weight_decay": 0.0}],
                            lr=1e-3)
    state = _trained(model, opt)
    info = optimizer_info(state, names, shapes)
    assert dict(info.param_ids) == {"0.weight": 0, "2.weight": 1, "0.bias": 2, "2.bias": 3}
    assert info.kind == "adamw" and "out of named_parameters() order" in info.notes[0]
    assert info.group_of("0.bias").weight_decay == 0.0 and info.differing == ("weight_decay",)
    torch.testing.assert_close(adam_preconditioner(state, info, ["2.bias"])["2.bias"],
                               _torch_p(state["state"][3], opt.param_groups[1]), rtol=1e-14, atol=0)


def test_mismatches_are_one_line_errors_naming_the_parameter_and_both_shapes():
    model = _mlp()
    state = _trained(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    other = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    names, shapes = _names_shapes(other)
    with pytest.raises(CurvscopeError, match=r"parameter '0.weight' has shape \(6, 3\), but the optimizer's "
                                             r"parameter 0 \(id 0\) has state of shape \(5, 3\)"):
        optimizer_info(state, names, shapes)
    names, shapes = _names_shapes(nn.Linear(3, 5))
    with pytest.raises(CurvscopeError, match="holds 4 parameters, the model has 2"):
        optimizer_info(state, names, shapes)
    with pytest.raises(CurvscopeError, match="not sgd's"):
        optimizer_info(state, *_names_shapes(model), kind_hint="sgd")
    with pytest.raises(CurvscopeError, match="not a torch.optim state_dict"):
        optimizer_info({"state": {}}, *_names_shapes(model))


def test_reordering_that_is_impossible_or_ambiguous_is_an_error():
    x, z, w = (nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(3))
    y = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.Adam([{"params": [x, y]}, {"params": [z, w], "lr": 0.1}])
    for p in (x, y, z, w):
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    # model order (2,), (2,), (3,), (2,): the groups interleave in two ways that agree with every shape
    shapes = {"n1": (2,), "n2": (2,), "n3": (3,), "n4": (2,)}
    with pytest.raises(CurvscopeError, match=r"parameter 'n2' has shape \(2,\), but the optimizer's parameter 1 "
                                             r"\(id 1\) has state of shape \(3,\) \(reordering .* is ambiguous\)"):
        optimizer_info(state, list(shapes), shapes)
    # no interleaving at all
    shapes = {"n1": (2,), "n2": (2,), "n3": (2,), "n4": (3,)}
    with pytest.raises(CurvscopeError, match="parameter 'n2' has shape"):
        optimizer_info(state, list(shapes), shapes)
    # the plain order agrees with every shape: taken as it is
    shapes = {"n1": (2,), "n2": (3,), "n3": (2,), "n4": (2,)}
    assert dict(optimizer_info(state, list(shapes), shapes).param_ids) == {"n1": 0, "n2": 1, "n3": 2, "n4": 3}


def test_adam_and_adamw_without_the_decoupled_flag_and_unknown_optimizers():
    model = _mlp()
    state = _trained(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1))
    for group in state["param_groups"]:
        del group["decoupled_weight_decay"]  # as older PyTorch saved it
    names, shapes = _names_shapes(model)
    guessed = optimizer_info(state, names, shapes)
    assert guessed.kind == "adam" and "cannot be told apart" in guessed.notes[0]
    assert optimizer_info(state, names, shapes, kind_hint="adamw").kind == "adamw"
    rms = _trained(model, torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9))
    info = optimizer_info(rms, names, shapes)
    assert info.kind is None and info.lr == 1e-3
    value, note = threshold(info)
    assert value is None and "not recognized" in note
    assert compared_sharpness(3.0, info)[0] is None


# -- Adam's preconditioner --------------------------------------------------------------------------------

def _torch_p(entry: dict, group: dict) -> torch.Tensor:
    """P as torch's Adam computes its denominator: (1 - b1^t) (sqrt(v) / sqrt(1 - b2^t) + eps)."""
    b1, b2 = group["betas"]
    t = float(entry["step"])
    v = entry["max_exp_avg_sq"] if group["amsgrad"] else entry["exp_avg_sq"]
    return (1 - b1 ** t) * (v.sqrt() / math.sqrt(1 - b2 ** t) + group["eps"])


@pytest.mark.parametrize("kwargs", [dict(), dict(amsgrad=True), dict(weight_decay=0.3, betas=(0.7, 0.9))])
def test_the_preconditioner_reproduces_torchs_adam_step(kwargs):
    """θ_new - θ_old = -lr exp_avg / P exactly, with P from the state after the step (float64)."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, **kwargs)
    _trained(model, opt, steps=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = _trained(model, opt, steps=1)
    names, shapes = _names_shapes(model)
    info = optimizer_info(state, names, shapes)
    p = adam_preconditioner(state, info, names)
    for i, (name, param) in enumerate(model.named_parameters()):
        assert p[name].dtype == torch.float64 and p[name].shape == param.shape
        step = param.detach() - before[name]
        torch.testing.assert_close(step, -0.01 * state["state"][i]["exp_avg"] / p[name], rtol=1e-12, atol=1e-15)


def test_no_preconditioner_before_the_first_step_or_without_state():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    names, shapes = _names_shapes(model)
    info = optimizer_info(opt.state_dict(), names, shapes)
    assert info.kind == "adam"
    with pytest.raises(NoPreconditioner, match="no Adam state for parameters '0.weight', '0.bias', '2.weight'"):
        adam_preconditioner(opt.state_dict(), info, names)
    by_hand = OptimizerInfo("adam", lr=1e-3, betas=(0.9, 0.999))
    with pytest.raises(NoPreconditioner, match="needs Adam's optimizer state"):
        compared_preconditioner(None, by_hand, names)
    with pytest.raises(CurvscopeError, match="not sgd's"):
        adam_preconditioner(opt.state_dict(), OptimizerInfo("sgd", lr=0.1), names)
    assert compared_preconditioner(None, OptimizerInfo("sgd", lr=0.1, weight_decay=0.1), names) is None


# -- the preconditioned operator against dense float64 -----------------------------------------------------

def _dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [p.numel() for p in named.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss(theta):
        parts = torch.split(theta, sizes)
        params = {n: t.reshape(named[n].shape) for n, t in zip(names, parts, strict=True)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.05)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
])
def test_preconditioned_sharpness_against_the_dense_matrix(cls, kwargs):
    model = _mlp()
    opt = cls(model.parameters(), **kwargs)
    state = _trained(model, opt, steps=5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    problem = make_problem(model, x, y, loss="ce", dtype="float64", device="cpu")
    names, shapes = _names_shapes(model)
    info = optimizer_info(state, names, shapes)
    h = _dense_hessian(model, x, y)
    torch.testing.assert_close(h, hessian_operator(problem).dense(), rtol=1e-10, atol=1e-12)
    p = flat_diagonal(adam_preconditioner(state, info, names), names, shapes)
    w = 0.0 if cls is torch.optim.AdamW else kwargs.get("weight_decay", 0.0)
    root = p.rsqrt()
    dense = root[:, None] * (h + w * torch.eye(len(p), dtype=torch.float64)) * root[None, :]
    expected = torch.linalg.eigvalsh(dense)
    # the same spectrum as the non-symmetric P^-1 (H + W)
    general = torch.linalg.eigvals((h + w * torch.eye(len(p), dtype=torch.float64)) / p[:, None])
    assert float(general.real.max()) == pytest.approx(float(expected.max()), rel=1e-9)
    op = compared_operator(hessian_operator(problem), state, info, shapes)
    torch.testing.assert_close(op.dense(), dense, rtol=1e-10, atol=1e-10)
    top = extreme_eigenpairs(op.matvec, op.dim, 1, which="largest", tol=1e-10, want_vectors=True)
    assert top.converged and float(top.top[0]) == pytest.approx(float(expected.max()), rel=1e-8)
    # the Ritz vector mapped back is an eigenvector of P^-1 (H + W)
    u = op.to_parameters(top.top_vectors[0])
    torch.testing.assert_close(((h + w * torch.eye(len(p), dtype=torch.float64)) @ u) / p, top.top[0] * u,
                               rtol=1e-6, atol=1e-9)
    compared, note = compared_sharpness(float(top.top[0]), info, preconditioned=True)
    limit, _ = threshold(info)
    assert limit == pytest.approx(38 / 0.01) and sharpness_ratio(compared, limit) == pytest.approx(
        float(expected.max()) / limit, rel=1e-8)


def test_operator_forms_and_input_checks():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = a + a.T
    p = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    s = torch.rand(5, generator=g, dtype=torch.float64)
    expected = (a + torch.diag(s)) / p.sqrt()[:, None] / p.sqrt()[None, :]

    class WithMatvec:
        dim = 5

        def matvec(self, v):
            return a @ v

    class WithMatmul:
        shape = (5, 5)

        def __matmul__(self, v):
            return a @ v

    for op, dim in ((a, None), (WithMatvec(), None), (WithMatmul(), None), (lambda v: a @ v, 5)):
        pre = preconditioned_operator(op, p, shift=s, dim=dim)
        assert pre.shape == (5, 5) and pre.dim == 5
        torch.testing.assert_close(pre.dense(), expected)
        v = torch.randn(5, 3, generator=g, dtype=torch.float64)
        torch.testing.assert_close(pre @ v, expected @ v)
        if isinstance(op, torch.Tensor):  # float32 vectors: the product is cast into the matrix's dtype and back
            torch.testing.assert_close(pre.matvec(v[:, 0].float()), (expected @ v[:, 0]).float())
    frozen = preconditioned_operator(a, torch.tensor([1.0, 1.0, 1.0, 1.0, math.inf], dtype=torch.float64))
    assert torch.equal(frozen.dense()[4], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(CurvscopeError, match="needs its dim"):
        preconditioned_operator(lambda v: a @ v, p)
    with pytest.raises(CurvscopeError, match="needs 5 floating entries"):
        preconditioned_operator(a, p[:4])
    with pytest.raises(CurvscopeError, match="not positive"):
        preconditioned_operator(a, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(CurvscopeError, match="acts on vectors of 5"):
        preconditioned_operator(a, p).matvec(torch.zeros(4))
    with pytest.raises(CurvscopeError, match="value has"):
        flat_diagonal({"w": torch.ones(3)}, ["w"], {"w": (2,)})
