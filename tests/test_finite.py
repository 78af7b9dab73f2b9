"""Finite or refused: an overflowing checkpoint never yields a report, and a NaN never passes a check."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_KWARGS, assert_clean_error, invoke, tiny_mlp, write_data

from curvscope.curvature.finite import check_finite
from curvscope.errors import CurvscopeError
from curvscope.io.checkpoints import save_checkpoint


@pytest.mark.parametrize("scale, needle", [(3e38, "outputs overflow"), (1e25, "not finite")])
def test_overflowing_weights_exit_2_and_write_nothing(tmp_path, tiny_data, scale, needle):
    model = tiny_mlp()
    with torch.no_grad():
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        linears[0].weight[0, 0] = 1e30  # one huge weight: tanh saturates
        linears[-1].weight.fill_(scale)  # 3e38: Inf logits; 1e25: finite logits, a Gram of 1e50 (Inf in float32)
    ckpt = tmp_path / "big.safetensors"
    save_checkpoint(ckpt, model, model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="mse")
    x, y = tiny_data
    data = write_data(tmp_path / "d.safetensors", x, torch.nn.functional.one_hot(y, 3).float())
    out = tmp_path / "out"
    assert_clean_error(invoke("spectrum", ckpt, "--data", data, "-o", out, "--dtype", "float32"), needle)
    assert not out.exists()
    result = invoke("check", ckpt, "--data", data, "-o", out, "-r", "groups[0].lambda_max <= 50", "--dtype",
                    "float32")
    assert_clean_error(result, needle)
    assert not (out / "report.json").exists()


def test_overflowing_inputs_name_the_samples(tmp_path, tiny_data):
    x, y = tiny_data
    x = x.clone()
    x[3] = 3e38
    data = write_data(tmp_path / "d.safetensors", x, y)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, tiny_mlp(), model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="ce")
    result = invoke("spectrum", ckpt, "--data", data, "-o", tmp_path / "o", "--dtype", "float32")
    err = assert_clean_error(result)
    assert "not finite" in err or "overflow" in err


def test_a_null_value_fails_its_rule(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "o"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out, "--no-plots").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    report["groups"][0]["lambda_max"] = None  # what a non-finite number would become in JSON
    (out / "report.json").write_text(json.dumps(report))
    result = invoke("check", out / "report.json", "-r", "groups[0].lambda_max <= 50")
    assert result.exit_code == 1


def test_check_finite_names_the_stage():
    check_finite("x", a=torch.ones(3), b=1.0, c=None)
    with pytest.raises(CurvscopeError, match=r"the Gram of fc1 is not finite: ev \(2 of 3\)"):
        check_finite("the Gram of fc1", ev=torch.tensor([1.0, float("nan"), float("inf")]))


def test_lr_suggest_and_factors_refuse_overflow_too(tmp_path, tiny_data):
    model = tiny_mlp()
    with torch.no_grad():
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        linears[-1].weight.fill_(3e38)  # Inf logits
    ckpt = tmp_path / "big.safetensors"
    save_checkpoint(ckpt, model, model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="ce")
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    for command in ("lr-suggest", "factors"):
        out = tmp_path / command
        assert_clean_error(invoke(command, ckpt, "--data", data, "-o", out, "--dtype", "float32"), "overflow")
        assert not out.exists()
