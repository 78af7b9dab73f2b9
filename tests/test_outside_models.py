"""Models nobody here wrote (issue #23; factories in ``outside_models.py``) against dense float64 references:
the Hessian by ``torch.autograd.functional.hessian``, the GGN from plain-autograd Jacobians."""

from __future__ import annotations

import json

import outside_models as om
import pytest
import torch
from conftest import invoke, write_data
from helpers import dense_any
from torch import nn
from torch.func import functional_call

from curvscope import make_problem
from curvscope.curvature.lr import reduced_hessian, third_order_diagonal
from curvscope.curvature.products import twice_differentiable
from curvscope.io.inputs import KeywordInputs

MODELS_FILE = om.__file__


def _outputs(problem, params):
    state = {**problem.buffers, **params}
    if isinstance(problem.inputs, KeywordInputs):
        return functional_call(problem.model, state, args=(), kwargs=dict(problem.inputs.items()))
    return functional_call(problem.model, state, (problem.inputs,))


def moved(problem, u, groups, eta):
    """theta(eta) = theta - sum_s eta_s u_s, differentiable in eta."""
    params = dict(problem.params)
    for s, group in enumerate(groups):
        for n in group.param_names:
            params[n] = params[n] - eta[s] * u[n]
    return params


def dense_h_bar(problem, u, groups, batch_loss):
    """H-bar = d^2 L(theta(eta)) / d eta^2 at 0, by torch.autograd.functional.hessian."""
    eta = torch.zeros(len(groups), dtype=torch.float64)
    with twice_differentiable():
        return torch.autograd.functional.hessian(
            lambda e: batch_loss(_logits(_outputs(problem, moved(problem, u, groups, e)))), eta)


def dense_d3(problem, u, groups, batch_loss, h: float = 1e-4):
    """d^3 L(theta(eta)) / d eta_s^3 at 0: central differences of autograd's second derivative."""
    out = []
    for s in range(len(groups)):
        def second(t, s=s):
            e = torch.zeros(len(groups), dtype=torch.float64)
            e[s] = t
            return dense_h_bar_at(problem, u, groups, batch_loss, e)[s, s]
        out.append((second(h) - second(-h)) / (2 * h))
    return torch.stack(out)


def dense_h_bar_at(problem, u, groups, batch_loss, eta0):
    with twice_differentiable():
        return torch.autograd.functional.hessian(
            lambda e: batch_loss(_logits(_outputs(problem, moved(problem, u, groups, e)))), eta0)


def _logits(out):
    return getattr(out, "logits", out)


def dense_ggn_h_bar(problem, u, groups, batch_loss):
    """(J U^T)^T H (J U^T) from the dense Jacobian and PyTorch's loss Hessian."""
    with twice_differentiable():
        dense = dense_any(problem, batch_loss)
    flat = torch.cat([u[n].reshape(-1) for n in problem.params])
    masks = torch.cat([torch.stack([torch.full((p.numel(),), float(n in g.param_names), dtype=torch.float64)
                                    for g in groups]) for n, p in problem.params.items()], dim=1)
    B = dense.factor @ (masks * flat).T
    return B.T @ B


def ce(y):
    return lambda out: nn.CrossEntropyLoss()(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# -- 1. forward-mode AD missing: every command falls back to double backward ---------------------------------------

def test_packed_lstm_products_fall_back_to_double_backward_and_match_autograd():
    x, y = om.sequences()
    torch.manual_seed(0)
    problem = make_problem(om.lstm(packed=True).eval(), x, y, loss="ce", dtype=torch.float64)
    groups, u = problem.groups("layer"), problem.gradient()
    h_bar = reduced_hessian(problem, u, groups, "hessian")
    assert "double backward (forward AD failed" in problem.path
    torch.testing.assert_close(h_bar, dense_h_bar(problem, u, groups, ce(y)), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(reduced_hessian(problem, u, groups, "ggn"),
                               dense_ggn_h_bar(problem, u, groups, ce(y)), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(third_order_diagonal(problem, u, groups), dense_d3(problem, u, groups, ce(y)),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("packed", [False, True])
def test_lr_suggest_runs_on_an_lstm_and_says_which_path(tmp_path, packed):
    x, y = om.sequences(12)
    data = write_data(tmp_path / "seq.safetensors", x, y)
    result = invoke("lr-suggest", "--model", f"{MODELS_FILE}:lstm", "--model-kwargs", json.dumps({"packed": packed}),
                    "--data", data, "--curvature", "ggn", "--cubic", "--device", "cpu", "--dtype", "float32",
                    "--no-plot", "--out",
                    tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    section = json.loads((tmp_path / "out" / "report.json").read_text())["lr"]
    assert "double backward (forward AD failed" in section["path"]
    assert all(r["recommended"] > 0 for r in section["groups"])


# -- 2. attention differentiated twice: PyTorch's math kernel ------------------------------------------------------

def _attention_problem(name: str):
    torch.manual_seed(0)
    if name == "mha":
        x, y = om.sequences()
        model = om.mha()
    else:
        x = torch.randint(1, 16, (6, 5), generator=torch.Generator().manual_seed(0))
        y = torch.arange(6) % om.CLASSES
        model = om.t5()
        x = KeywordInputs({"input_ids": x})
    return make_problem(model.eval(), x, y, loss="ce", dtype=torch.float64, device="cpu"), y


def _attention_names(problem, name):
    key = "attention" if name == "mha" else "SelfAttention"
    return [n for n in problem.params if key in n]


@pytest.mark.parametrize("name", ["mha", "t5"])
def test_attention_hessian_and_ggn_operators_match_dense_references(name):
    import curvscope

    problem, y = _attention_problem(name)
    names = _attention_names(problem, name)
    x, y, model = problem.inputs, problem.targets, problem.model  # the API's verbs on the model itself
    H = curvscope.hessian_operator(model, x, y, names=names, loss="ce", dtype=torch.float64, device="cpu").dense()
    G = curvscope.ggn_operator(model, x, y, names=names, loss="ce", dtype=torch.float64, device="cpu").dense()
    flat = torch.cat([problem.params[n].reshape(-1) for n in names])

    def loss_of(theta):
        params, i = dict(problem.params), 0
        for n in names:
            k = problem.params[n].numel()
            params[n] = theta[i:i + k].reshape(problem.params[n].shape)
            i += k
        return ce(y)(_logits(_outputs(problem, params)))

    with twice_differentiable():
        ref_h = torch.autograd.functional.hessian(loss_of, flat)
        dense = dense_any(problem, ce(y)) if name == "mha" else None
    # T5's RMS norm and softmax compute in float32 whatever the dtype: agreement to float32 rounding only
    rtol, atol = (1e-8, 1e-11) if name == "mha" else (1e-4, 1e-6 * float(ref_h.abs().max()))
    torch.testing.assert_close(H, ref_h, rtol=rtol, atol=atol)
    if dense is not None:
        from helpers import group_index

        idx = group_index(problem.params, names)
        torch.testing.assert_close(G, dense.G[idx][:, idx], rtol=1e-8, atol=1e-11)
    # lr-suggest's reduced Hessian takes forward-mode AD through the math kernel (no fallback needed)
    groups, u = problem.groups("layer"), problem.gradient()
    ref = dense_h_bar(problem, u, groups, ce(y))
    torch.testing.assert_close(reduced_hessian(problem, u, groups, "hessian"), ref, rtol=rtol,
                               atol=1e-12 if name == "mha" else 1e-6 * float(ref.abs().max()))
    assert "double backward" not in problem.path


def test_lr_suggest_and_hessian_spectrum_run_on_t5(tmp_path):
    from safetensors.torch import save_file

    ids = torch.randint(1, 16, (8, 5), generator=torch.Generator().manual_seed(0))
    data = tmp_path / "t5.safetensors"
    save_file({"input_ids": ids, "y": torch.arange(8) % om.CLASSES}, str(data))
    for command, extra in (("lr-suggest", ["--no-plot"]), ("spectrum", ["--curvature", "hessian", "--no-plots"])):
        result = invoke(command, "--model", f"{MODELS_FILE}:t5", "--data", data, "--device", "cpu", *extra, "--out",
                        tmp_path / command)
        assert result.exit_code == 0, result.stderr


def test_hessian_spectrum_of_a_llama_with_sdpa_attention(tmp_path):
    from safetensors.torch import save_file

    ids = torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(0))
    data = tmp_path / "lm.safetensors"
    save_file({"input_ids": ids, "labels": ids.clone()}, str(data))
    result = invoke("spectrum", "--model", f"{MODELS_FILE}:llama", "--model-kwargs", '{"attn": "sdpa"}', "--data", data,
                    "--shift-labels", "--curvature", "hessian", "--top-k", "3", "--device", "cpu", "--no-plots",
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr


# -- 3. models that compute below the run's dtype ---------------------------------------------------------------

def _lm_batch(n: int = 6):
    ids = torch.randint(0, 12, (n, 6), generator=torch.Generator().manual_seed(0))
    return KeywordInputs({"input_ids": ids}), ids


def test_a_float64_llama_is_found_computing_in_float32_and_its_h_bar_passes_the_self_check():
    torch.manual_seed(0)
    x, ids = _lm_batch()
    problem = make_problem(om.llama("eager").eval(), x, ids, loss="ce", dtype=torch.float64, shift_labels=True)
    assert problem.dtype == torch.float64 and problem.compute_dtype == torch.float32
    assert problem.precision == torch.float32 and problem.eps == torch.finfo(torch.float32).eps
    note = problem.info["precision_note"]
    assert "float32 at dtype float64" in note and "LlamaRMSNorm" in note
    groups, u = problem.groups("layer"), problem.gradient()
    h_bar = reduced_hessian(problem, u, groups, "hessian")  # raised SelfCheckError (5e-8 > 1.5e-8) before

    def batch_loss(out):
        return nn.CrossEntropyLoss()(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))

    ref = dense_h_bar(problem, u, groups, batch_loss)
    # the reference computes through the same float32 internals: agreement to float32 rounding, not float64
    torch.testing.assert_close(h_bar, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_the_products_are_exact_when_the_internals_are_float64():
    """The cause of the asymmetry is the model's float32 RMSNorm, not the products: the same model with its
    norms in float64 gives a float64-symmetric H-bar."""
    from curvscope.curvature import products
    from curvscope.curvature.lr.reduced import _pairwise, group_tangents

    class Norm(nn.Module):
        def __init__(self, upcast):
            super().__init__()
            self.upcast, self.weight = upcast, nn.Parameter(torch.ones(6))

        def forward(self, h):
            x = h.to(torch.float32) if self.upcast else h
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.weight * x.to(h.dtype)

    asym = {}
    for upcast in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), Norm(upcast), nn.Tanh(), nn.Linear(6, 6), Norm(upcast),
                              nn.Linear(6, om.CLASSES))
        problem = make_problem(model, torch.randn(8, 4), torch.arange(8) % om.CLASSES, loss="ce",
                               dtype=torch.float64)
        assert problem.compute_dtype == (torch.float32 if upcast else None)
        groups, u = problem.groups("layer"), problem.gradient()
        U = group_tangents(u, groups)
        h = _pairwise(U, products.hessian_vector_products(problem, U))
        asym[upcast] = float((h - h.T).abs().max() / h.abs().max())
    assert asym[False] < 1e-14 < 1e-9 < asym[True] < 1e-5


@pytest.mark.parametrize("name", ["mha", "lstm", "zoo"])
def test_models_computing_in_their_dtype_are_not_flagged(name):
    x, y = om.sequences()
    if name == "zoo":
        x = torch.randn(6, 4)
    problem = make_problem(getattr(om, name)().eval(), x, y, loss="ce", dtype=torch.float64)
    assert problem.compute_dtype is None and problem.precision == torch.float64
    assert "precision_note" not in problem.info


def test_lr_suggest_and_spectrum_on_a_float64_llama_report_its_float32_internals(tmp_path):
    from safetensors.torch import save_file

    _, ids = _lm_batch(8)
    data = tmp_path / "lm.safetensors"
    save_file({"input_ids": ids, "labels": ids.clone()}, str(data))
    common = ["--model", f"{MODELS_FILE}:llama", "--data", data, "--shift-labels", "--dtype", "float64", "--device",
              "cpu", "--out", tmp_path / "out"]
    result = invoke("lr-suggest", *common, "--no-plot")
    assert result.exit_code == 0, result.stderr  # exit 3 (the self-check) before
    assert "computes parts of itself in float32 at dtype float64" in result.stderr
    result = invoke("spectrum", *common, "--no-plots", "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["problem"]["dtype"] == "float64" and report["problem"]["compute_dtype"] == "float32"
    assert "LlamaRMSNorm" in report["problem"]["precision_note"]
    assert report["precision"] == "float32"  # the rank floor is float32's
    group = report["groups"][0]
    eps = torch.finfo(torch.float32).eps
    assert group["eigenvalue_floor"] == pytest.approx(group["lambda_max"] * report["approximation"]["num_columns"]
                                                      * eps)
    assert "lr" in report
