"""The Problem: functional model, batch and loss, against the plain nn.Module and autograd (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_mlp
from torch import nn

from curvscope import make_problem
from curvscope.errors import CurvscopeError
from curvscope.problem import resolve_device, resolve_dtype

TORCH_MEAN = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def tiny_batch(loss: str, n: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = {"ce": torch.arange(n) % 3, "mse": torch.randn(n, 3, generator=g, dtype=torch.float64),
         "bce": torch.rand(n, 3, generator=g, dtype=torch.float64)}[loss]
    return x, y


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_forward_loss_and_gradient_equal_the_module(loss):
    model = tiny_mlp().double()
    x, y = tiny_batch(loss)
    problem = make_problem(model, x, y, loss=loss, dtype="float64", device="cpu")
    torch.testing.assert_close(problem.forward(), model(x))
    reference = TORCH_MEAN[loss]()(model(x), y)
    torch.testing.assert_close(problem.loss_value(), reference)
    per_sample = torch.stack([TORCH_MEAN[loss]()(model(x[i:i + 1]), y[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(problem.per_sample_loss(), per_sample)
    model.zero_grad()
    reference.backward()
    grads = problem.gradient()
    assert list(grads) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_forward_at_other_parameters_and_inputs():
    model = tiny_mlp().double()
    x, y = tiny_batch("ce")
    problem = make_problem(model, x, y, dtype=torch.float64, device="cpu")
    shifted = {k: v + 0.1 for k, v in problem.params.items()}
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    torch.testing.assert_close(problem.forward(shifted), other(x))
    torch.testing.assert_close(problem.forward(inputs=x[:2]), model(x[:2]))
    assert torch.equal(problem.params["1.weight"], model[1].weight.detach())  # problem params untouched


def test_parameters_are_copies_in_the_requested_dtype():
    model = tiny_mlp()
    x, y = tiny_batch("ce")
    problem = make_problem(model, x.float(), y, dtype="float64", device="cpu")
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in problem.params.values())
    assert problem.inputs.dtype == torch.float64 and problem.targets.dtype == torch.long
    assert model[1].weight.dtype == torch.float32  # the user's model is not modified
    assert problem.num_params == 4 * 5 + 5 + 5 * 3 + 3
    assert problem.num_outputs == 3 and problem.batch_size == 6


def test_frozen_parameters_are_not_trainable():
    model = tiny_mlp().double()
    model[1].weight.requires_grad_(False)
    x, y = tiny_batch("ce")
    problem = make_problem(model, x, y, dtype="float64", device="cpu")
    assert "1.weight" not in problem.params and "1.weight" in problem.buffers
    torch.testing.assert_close(problem.forward(), model(x))
    assert problem.num_params == 5 + 5 * 3 + 3


def test_groups():
    model = tiny_mlp().double()
    x, y = tiny_batch("ce")
    problem = make_problem(model, x, y, dtype="float64", device="cpu")
    names = ("1.weight", "1.bias", "3.weight", "3.bias")
    assert [(g.name, g.param_names) for g in problem.groups("all")] == [("all", names)]
    assert [(g.name, g.param_names) for g in problem.groups("layer")] == [
        ("1", ("1.weight", "1.bias")), ("3", ("3.weight", "3.bias"))]
    assert [g.param_names for g in problem.groups("tensor")] == [(n,) for n in names]
    with pytest.raises(CurvscopeError, match="unknown parameter grouping 'block'"):
        problem.groups("block")


def test_root_parameters_form_their_own_layer_group():
    from curvscope.models import transformer

    torch.manual_seed(0)
    model = transformer(seq_len=2, token_dim=3, dim=4, heads=2, num_classes=3)
    x = torch.randn(5, 6, dtype=torch.float64)
    problem = make_problem(model, x, torch.arange(5) % 3, dtype="float64", device="cpu")
    groups = problem.groups("layer")
    assert groups[0].name == "pos" and groups[0].param_names == ("pos",)
    assert sum(len(g.param_names) for g in groups) == len(problem.params)


def test_other_batches():
    model = tiny_mlp().double()
    x, y = tiny_batch("ce", n=10)
    problem = make_problem(model, x[:4], y[:4], dtype="float64", device="cpu", dataset=(x.float(), y),
                           info={"batch_indices": [0, 1, 2, 3]})
    other = problem.batch_from_dataset(torch.tensor([7, 2]))
    assert other.info["batch_indices"] == [7, 2] and other.batch_size == 2
    assert other.inputs.dtype == torch.float64
    torch.testing.assert_close(other.loss_value(), nn.CrossEntropyLoss()(model(x[[7, 2]]), y[[7, 2]]))
    assert problem.info["batch_indices"] == [0, 1, 2, 3]  # the original is unchanged
    swapped = problem.with_batch(x[5:], y[5:], note="tail")
    assert swapped.batch_size == 5 and swapped.info["note"] == "tail"
    no_data = make_problem(model, x, y, dtype="float64", device="cpu")
    with pytest.raises(CurvscopeError, match="without a dataset"):
        no_data.batch_from_dataset(torch.tensor([0]))


@pytest.mark.parametrize(("build", "match"), [
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), "BatchNorm in train mode"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), "Dropout in train mode"),
    (lambda: nn.Sequential(nn.Linear(4, 3).requires_grad_(False)), "no trainable parameters"),
    (lambda: nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), r"shape \(N, C\)"),
    (lambda: nn.Sequential(nn.Linear(5, 3)), r"cannot run on inputs of shape \(4,\)"),
])
def test_models_that_are_refused(build, match):
    x, y = tiny_batch("ce")
    with pytest.raises(CurvscopeError, match=match):
        make_problem(build(), x, y, device="cpu")


def test_eval_mode_batchnorm_and_zero_dropout_are_accepted():
    x, y = tiny_batch("ce")
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.0)).double()
    model[1].eval()
    problem = make_problem(model, x, y, dtype="float64", device="cpu")
    torch.testing.assert_close(problem.forward(), model(x))
    assert "1.running_mean" in problem.buffers


def test_bad_batches():
    model = tiny_mlp()
    x, y = tiny_batch("ce")
    with pytest.raises(CurvscopeError, match="6 inputs but 5 targets"):
        make_problem(model, x, y[:5], device="cpu")
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(CurvscopeError, match="NaN or Inf"):
        make_problem(model, bad, y, device="cpu")
    with pytest.raises(CurvscopeError, match=r"labels must lie in \[0, 3\)"):
        make_problem(model, x, y + 1, device="cpu")
    mse_targets = torch.zeros(6, dtype=torch.long)
    with pytest.raises(CurvscopeError, match=r"shape \(N, 3\)"):
        make_problem(model, x, mse_targets, loss="mse", device="cpu")


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    # auto: float64 on the CPU (the rank is not float32's precision floor), float32 on a GPU
    assert resolve_dtype(None) == torch.float64 == resolve_dtype("auto", "cpu")
    assert resolve_dtype("float64") == torch.float64
    assert resolve_dtype(None, "cuda") == torch.float32 == resolve_dtype("auto", torch.device("cuda:0"))
    assert resolve_dtype(torch.float64) == torch.float64
    for bad, match in [("tpu", "not a device"), ("meta", "unsupported device type")]:
        with pytest.raises(CurvscopeError, match=match):
            resolve_device(bad)
    for bad in ("float16", torch.bfloat16):
        with pytest.raises(CurvscopeError, match="not supported"):
            resolve_dtype(bad)
    if not torch.cuda.is_available():
        for dev in ("cuda", "cuda:0"):
            with pytest.raises(CurvscopeError, match="no CUDA GPU"):
                resolve_device(dev)
