"""``curvscope info``'s metric for each loss, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import invoke, write_data

from curvscope.losses import get_loss
from curvscope.metrics import batch_metrics

F64 = torch.float64


def values(loss, outputs, targets):
    return {m.name: (m.value, m.text) for m in batch_metrics(loss, torch.tensor(outputs, dtype=F64), targets)}


def test_accuracy_for_ce_and_nll():
    logits = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]]  # argmax 0, 1, 2, 0
    y = torch.tensor([0, 1, 0, 0])
    assert values(get_loss("ce"), logits, y) == {"batch accuracy": (0.75, "75.00%")}
    logp = torch.tensor(logits, dtype=F64).log_softmax(-1).tolist()  # nll takes log-probabilities: same argmax
    assert values(get_loss("nll"), logp, y) == {"batch accuracy": (0.75, "75.00%")}
    weighted = get_loss("ce", class_weights=[1.0, 2.0, 3.0])
    assert values(weighted, logits, y)["batch accuracy"] == (0.75, "75.00% (unweighted)")


def test_accuracy_per_valid_token():
    loss = get_loss("ce").sequence(3, 2)
    # sample 0: tokens predict 0, 1, 1; sample 1: 1, 0, 0 (outputs flattened to T*C)
    outputs = [[1.0, 0.0, 0.0, 1.0, 0.0, 2.0], [0.0, 1.0, 3.0, 0.0, 1.0, 0.0]]
    y = torch.tensor([[0, 0, -100], [1, 0, 1]])  # valid: 0 ok, 1 wrong; 1 ok, 0 ok, 0 wrong -> 3 of 5
    assert values(loss, outputs, y) == {"batch accuracy": (0.6, "60.00% of valid tokens")}


def test_binary_accuracy_for_bce_at_threshold_one_half():
    logits = [[2.0, -1.0, 0.5], [-3.0, 0.1, -0.2]]  # sigmoid > 0.5: T F T / F T F
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # right: yes yes no / yes yes no -> 4 of 6
    (acc, text), = values(get_loss("bce"), logits, y).values()
    assert acc == pytest.approx(4 / 6) and text == "66.67% of 6 labels (sigmoid > 0.5)"
    soft = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.6, 0.7]])  # rounded at 0.5: the same labels
    (acc, text), = values(get_loss("bce"), logits, soft).values()
    assert acc == pytest.approx(4 / 6) and text.endswith("(sigmoid > 0.5; soft targets rounded at 0.5)")


@pytest.mark.parametrize("name", ["mse", "huber", "smooth-l1"])
def test_rmse_and_r2_for_regression_losses(name):
    # one output: residuals 0, 0, -1 -> SSE 1, RMSE sqrt(1/3); mean 7/3, SST 16/9 + 1/9 + 25/9 = 14/3 -> R^2 11/14
    got = values(get_loss(name), [[1.0], [2.0], [3.0]], torch.tensor([[1.0], [2.0], [4.0]], dtype=F64))
    assert got["batch RMSE"][0] == pytest.approx(math.sqrt(1 / 3), rel=1e-15)
    assert got["batch R²"][0] == pytest.approx(11 / 14, rel=1e-15)
    assert got["batch R²"][1].startswith("0.7857 ")
    # two outputs, each about its own mean: y = [[0, 10], [2, 14]], f = [[1, 10], [1, 13]]
    # SSE = 1 + 0 + 1 + 1 = 3; SST = (1 + 1) + (4 + 4) = 10 -> R^2 0.7; RMSE sqrt(3/4)
    got = values(get_loss(name), [[1.0, 10.0], [1.0, 13.0]], torch.tensor([[0.0, 10.0], [2.0, 14.0]], dtype=F64))
    assert got["batch RMSE"][0] == pytest.approx(math.sqrt(0.75), rel=1e-15)
    assert got["batch R²"][0] == pytest.approx(0.7, rel=1e-14)
    constant = values(get_loss(name), [[1.0], [3.0]], torch.tensor([[2.0], [2.0]], dtype=F64))
    assert constant["batch RMSE"][0] == 1.0
    assert constant["batch R²"] == (None, "n/a: the targets are constant over the batch")


def test_sequence_regression_pools_tokens_per_output():
    loss = get_loss("mse").sequence(2, 1)
    # tokens (sample, position): f = 1, 2 | 3, 5; y = 1, 2 | 4, 4 -> SSE 2; ybar 11/4, SST 121/16*... by hand:
    # y - ybar = -1.75, -0.75, 1.25, 1.25 -> SST 3.0625 + 0.5625 + 1.5625 + 1.5625 = 6.75 -> R^2 1 - 2/6.75
    got = values(loss, [[1.0, 2.0], [3.0, 5.0]], torch.tensor([[[1.0], [2.0]], [[4.0], [4.0]]], dtype=F64))
    assert got["batch RMSE"][0] == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert got["batch R²"][0] == pytest.approx(1 - 2 / 6.75, rel=1e-14)


def test_a_user_loss_has_no_metric_and_says_so():
    def fn(f, y):
        return (f - y).pow(2).sum(-1)

    (metric,) = batch_metrics(get_loss(fn), torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64))
    assert metric.value is None and metric.text.startswith("none: curvscope knows no metric for the user loss python:")


USER_LOSS = """
def logcosh(outputs, targets):
    import torch
    return torch.log(torch.cosh(outputs - targets)).mean(-1)
"""


def test_info_prints_the_metric_of_each_loss(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(12, 4, dtype=F64)
    model = ["--model", "mlp", "--model-kwargs", '{"in_features": 4, "hidden": [5], "out_features": 3}',
             "--device", "cpu", "--dtype", "float64"]
    labels = write_data(tmp_path / "labels.safetensors", x, torch.arange(12) % 3)
    multi = write_data(tmp_path / "multi.safetensors", x, (torch.arange(36).reshape(12, 3) % 2).to(F64))
    regression = write_data(tmp_path / "reg.safetensors", x, torch.randn(12, 3, dtype=F64))
    (tmp_path / "myloss.py").write_text(USER_LOSS)
    cases = [("ce", labels, "batch accuracy"), ("bce", multi, "batch binary accuracy"),
             ("mse", regression, "batch RMSE"), ("huber", regression, "batch R²"),
             (f"{tmp_path / 'myloss.py'}:logcosh", regression, "none: curvscope knows no metric")]
    from curvscope import load_problem
    from curvscope.cli.info import describe

    for loss, data, needle in cases:
        result = invoke("info", *model, "--data", data, "--loss", loss)
        assert result.exit_code == 0, result.stderr
        assert needle in result.stdout, (loss, result.stdout)
    # the numbers are those of the loaded problem's outputs, as the unit tests above check them by hand
    problem = load_problem(model="mlp", model_kwargs={"in_features": 4, "hidden": [5], "out_features": 3},
                           data=str(regression), loss="mse", device="cpu", dtype="float64")
    facts = describe(problem)["facts"]
    with torch.no_grad():
        f = problem.forward()
    rmse = float((f - problem.targets).pow(2).mean().sqrt())
    assert facts["batch RMSE"] == f"{rmse:.6g}"
