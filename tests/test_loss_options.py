"""The losses people train with (issue #23): label smoothing, class weights, nll on log-probabilities,
huber / smooth-l1 and a user loss, per sample and per token, against PyTorch's own losses and
``torch.autograd.functional.hessian`` (docs/conventions.md §1)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_clean_error, invoke, write_data
from helpers import dense_any
from torch import nn

from curvscope import make_problem
from curvscope.curvature.gram.spectrum import compute_spectrum
from curvscope.curvature.matfree.operators import ggn_operator
from curvscope.errors import CurvscopeError, OptionError
from curvscope.losses import get_loss

N, C = 6, 4
W = [1.0, 2.5, 0.0, 0.7]


def logits(seed: int = 0, shape=(N, C)):
    return 2 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def labels(seed: int = 1, shape=(N,)):
    return torch.randint(0, C, shape, generator=torch.Generator().manual_seed(seed))


def block_hessians(batch_loss, outputs):
    """The per-sample blocks of N * d^2 L / d outputs^2 (samples are independent: ``l_n = N L`` restricted)."""
    n = outputs.shape[0]
    H = torch.autograd.functional.hessian(lambda f: n * batch_loss(f), outputs)
    flat = H.reshape(n, -1, n, outputs[0].numel())
    return torch.stack([flat[i, :, i] for i in range(n)])


CE_CASES = {
    "smoothing": dict(label_smoothing=0.2),
    "weights": dict(class_weights=W),
    "both": dict(label_smoothing=0.3, class_weights=W),
}


@pytest.mark.parametrize("case", CE_CASES)
def test_ce_options_equal_torch_in_value_gradient_and_hessian(case):
    options = CE_CASES[case]
    f, y = logits(), labels()
    ref = nn.CrossEntropyLoss(weight=torch.tensor(W, dtype=torch.float64) if "class_weights" in options else None,
                              label_smoothing=options.get("label_smoothing", 0.0))
    loss = get_loss("ce", **options).for_batch(y)
    torch.testing.assert_close(loss(f, y), ref(f, y), rtol=1e-12, atol=0)
    o = f.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(N * ref(o, y), o)  # row n: d l_n / d f_n
    torch.testing.assert_close(loss.output_gradient(f, y), g, rtol=1e-10, atol=1e-14)
    H = block_hessians(lambda out: ref(out, y), f)
    torch.testing.assert_close(loss.hessian(f, y), H, rtol=1e-10, atol=1e-14)
    p = f.softmax(-1)
    softmax_hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    if "class_weights" not in options:  # smoothing is linear in the targets: the softmax's Hessian, unchanged
        torch.testing.assert_close(loss.hessian(f, y), softmax_hessian, rtol=1e-10, atol=1e-14)
    # the Hessian-vector products of the matrix-free wing are the same matrices
    w = torch.randn(N, C, dtype=torch.float64)
    torch.testing.assert_close(loss.hessian_product(f, y)(w), torch.einsum("ncd,nd->nc", H, w), rtol=1e-10,
                               atol=1e-14)


def test_nll_equals_torch_and_its_ggn_is_that_of_ce_on_the_logits():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C))
    model = nn.Sequential(body, nn.LogSoftmax(dim=-1))
    x, y = torch.randn(N, 3, dtype=torch.float64), labels()
    for weights in (None, W):
        w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        nll = make_problem(model, x, y, loss=get_loss("nll", class_weights=weights), dtype=torch.float64)
        ce = make_problem(body, x, y, loss=get_loss("ce", class_weights=weights), dtype=torch.float64)
        torch.testing.assert_close(nll.loss_value(), nn.NLLLoss(weight=w)(model.double()(x), y), rtol=1e-12, atol=0)
        # nll's GGN splits at the log-probabilities with the categorical Hessian diag(p) - pp^T, p = exp(f):
        # equal to the GGN of ce at the logits (log_softmax is idempotent), from dense Jacobians of the body
        dense = dense_any(ce, lambda out, w=w: nn.CrossEntropyLoss(weight=w)(out, y))
        evals = torch.linalg.eigvalsh(dense.G).flip(0)
        got = compute_spectrum(nll).groups[0]
        torch.testing.assert_close(got.eigenvalues, evals[:got.rank], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(torch.cat([g.reshape(-1) for g in nll.gradient().values()]),
                                   dense.gn.mean(0), rtol=1e-10, atol=1e-13)


def test_nll_refuses_outputs_that_are_not_log_probabilities():
    with pytest.raises(OptionError, match="needs log-probabilities"):
        make_problem(nn.Linear(3, C), torch.randn(N, 3), labels(), loss="nll")


@pytest.mark.parametrize("name, option, torch_loss", [
    ("huber", {"huber_delta": 0.7}, nn.HuberLoss(delta=0.7)),
    ("smooth-l1", {"smooth_l1_beta": 0.4}, nn.SmoothL1Loss(beta=0.4)),
    ("smooth-l1", {"smooth_l1_beta": 0.0}, nn.SmoothL1Loss(beta=0.0)),
    ("huber", {}, nn.HuberLoss()),
])
def test_huber_and_smooth_l1_equal_torch(name, option, torch_loss):
    f, y = logits(), logits(3)
    loss = get_loss(name, **option)
    torch.testing.assert_close(loss(f, y), torch_loss(f, y), rtol=1e-12, atol=0)
    o = f.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(N * torch_loss(o, y), o)
    torch.testing.assert_close(loss.output_gradient(f, y), g, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss.hessian(f, y), block_hessians(lambda out: torch_loss(out, y), f), rtol=1e-10,
                               atol=1e-14)
    gen = torch.Generator().manual_seed(0)
    S = loss.mc_sqrt(f, y, 20000, gen)
    torch.testing.assert_close(S @ S.transpose(1, 2), loss.hessian(f, y), rtol=0, atol=0.05 / C)


def test_sequence_ce_with_smoothing_weights_and_ignored_tokens_equals_torch():
    T = 3
    f, y = logits(shape=(N, T, C)), labels(shape=(N, T))
    y[0, 1] = y[2, 0] = -100
    ref = nn.CrossEntropyLoss(weight=torch.tensor(W, dtype=torch.float64), label_smoothing=0.15)
    loss = get_loss("ce", label_smoothing=0.15, class_weights=W).sequence(T, C).for_batch(y)
    flat = f.reshape(N, T * C)
    torch.testing.assert_close(loss(flat, y), ref(f.reshape(-1, C), y.reshape(-1)), rtol=1e-12, atol=0)
    H = block_hessians(lambda out: ref(out.reshape(-1, C), y.reshape(-1)), flat)
    torch.testing.assert_close(loss.hessian(flat, y), H, rtol=1e-10, atol=1e-14)
    huber = get_loss("huber", huber_delta=0.5).sequence(T, C)
    target = logits(5, (N, T, C))
    huber = huber.for_batch(target)
    torch.testing.assert_close(huber(flat, target), nn.HuberLoss(delta=0.5)(f, target), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_name", ["ce-both", "huber"])
def test_exact_ggn_spectrum_and_ggn_operator_of_the_new_losses_match_the_dense_ggn(loss_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C))
    x = torch.randn(N, 3, dtype=torch.float64)
    if loss_name == "huber":
        y, loss, ref = logits(7) / 3, get_loss("huber", huber_delta=0.6), nn.HuberLoss(delta=0.6)
    else:
        y = labels()
        loss = get_loss("ce", label_smoothing=0.2, class_weights=W)
        ref = nn.CrossEntropyLoss(weight=torch.tensor(W, dtype=torch.float64), label_smoothing=0.2)
    problem = make_problem(model, x, y, loss=loss, dtype=torch.float64)
    torch.testing.assert_close(problem.loss_value(), ref(model.double()(x), y), rtol=1e-12, atol=0)
    dense = dense_any(problem, lambda out: ref(out, y))
    evals = torch.linalg.eigvalsh(dense.G).flip(0)
    got = compute_spectrum(problem).groups[0]
    torch.testing.assert_close(got.eigenvalues, evals[:got.rank], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ggn_operator(problem).dense(), dense.G, rtol=1e-8, atol=1e-13)


# -- a user loss ---------------------------------------------------------------------------------------------

USER_LOSS = '''
import torch

def logcosh(outputs, targets):
    return torch.log(torch.cosh(outputs - targets)).mean(-1)

def wavy(outputs, targets):
    return torch.sin(3 * (outputs - targets)).sum(-1)

def batchwise(outputs, targets):
    return (outputs - targets).pow(2).mean(-1) * outputs.shape[0]
'''


def test_a_user_loss_gets_its_hessian_by_autograd_and_the_exact_ggn(tmp_path):
    file = tmp_path / "myloss.py"
    file.write_text(USER_LOSS)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C))
    x, y = torch.randn(N, 3, dtype=torch.float64), logits(7) / 2

    def reference(out):
        return torch.log(torch.cosh(out - y)).mean()

    problem = make_problem(model, x, y, loss=f"{file}:logcosh", dtype=torch.float64)
    assert problem.loss.name == f"{file}:logcosh"
    out = model.double()(x).detach()
    torch.testing.assert_close(problem.loss.hessian(out, y), block_hessians(reference, out), rtol=1e-10, atol=1e-14)
    dense = dense_any(problem, reference)
    evals = torch.linalg.eigvalsh(dense.G).flip(0)
    got = compute_spectrum(problem).groups[0]
    torch.testing.assert_close(got.eigenvalues, evals[:got.rank], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ggn_operator(problem).dense(), dense.G, rtol=1e-8, atol=1e-13)
    # a function passed in Python works the same
    same = make_problem(model, x, y, loss=lambda f, t: torch.log(torch.cosh(f - t)).mean(-1), dtype=torch.float64)
    torch.testing.assert_close(compute_spectrum(same).groups[0].eigenvalues, got.eigenvalues, rtol=1e-12, atol=0)
    # a loss that is not convex in the outputs has no GGN, and one that couples the samples is refused
    wavy = make_problem(model, x, y, loss=f"{file}:wavy", dtype=torch.float64)
    with pytest.raises(CurvscopeError, match="not convex in the outputs"):
        compute_spectrum(wavy)
    with pytest.raises(CurvscopeError, match="changes with the other samples"):
        make_problem(model, x, y, loss=f"{file}:batchwise", dtype=torch.float64)


def test_user_loss_on_the_command_line_and_its_trust_rule(tmp_path):
    from safetensors.torch import save_file

    from curvscope.models import mlp

    file = tmp_path / "myloss.py"
    file.write_text(USER_LOSS)
    data = write_data(tmp_path / "d.safetensors", torch.randn(12, 4), torch.randn(12, 3))
    kwargs = '{"in_features": 4, "hidden": [5], "out_features": 3}'
    result = invoke("spectrum", "--model", "mlp", "--model-kwargs", kwargs, "--data", data, "--loss",
                    f"{file}:logcosh", "--no-plots", "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["problem"]["loss"] == f"{file}:logcosh"
    # a checkpoint whose metadata names a user loss: its code runs only with --trust-model-code
    torch.manual_seed(0)
    net = mlp(4, [5], 3)
    ckpt = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt),
              metadata={"curvscope.model": "mlp", "curvscope.model_kwargs": kwargs,
                        "curvscope.loss": f"{file}:logcosh"})
    result = invoke("spectrum", ckpt, "--data", data, "--no-plots", "--device", "cpu", "--out", tmp_path / "o2")
    assert_clean_error(result, "asks to import and run the loss", "--trust-model-code")
    result = invoke("spectrum", ckpt, "--data", data, "--no-plots", "--device", "cpu", "--trust-model-code",
                    "--out", tmp_path / "o2")
    assert result.exit_code == 0, result.stderr


def test_loss_flags_on_the_command_line(tmp_path):
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    data = write_data(tmp_path / "d.safetensors", x, y)
    weights = tmp_path / "w.txt"
    weights.write_text("1 2 0.5\n")
    common = ["--model", "mlp", "--model-kwargs", '{"in_features": 4, "hidden": [5], "out_features": 3}', "--data",
              data, "--no-plots", "--device", "cpu", "--dtype", "float64", "--out", tmp_path / "out"]
    result = invoke("spectrum", *common, "--label-smoothing", "0.1", "--class-weights", weights)
    assert result.exit_code == 0, result.stderr
    problem = json.loads((tmp_path / "out" / "report.json").read_text())["problem"]
    assert problem["loss_options"] == {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5]}
    assert_clean_error(invoke("spectrum", *common, "--loss", "mse", "--label-smoothing", "0.1"),
                       "--label-smoothing does not apply to loss 'mse'")
    assert_clean_error(invoke("spectrum", *common, "--class-weights", "1,2"), "2 class weights for a model with 3")
    assert_clean_error(invoke("spectrum", *common, "--label-smoothing", "1.5"), "--label-smoothing")
    assert_clean_error(invoke("spectrum", *common, "--loss", "huber", "--huber-delta", "0"), "--huber-delta")
    assert_clean_error(invoke("spectrum", *common, "--class-weights", "nofile.txt"), "--class-weights")
