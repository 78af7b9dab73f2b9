"""Trust: a checkpoint or config file never makes curvscope import code the user did not name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_KWARGS, assert_clean_error, invoke, tiny_mlp, write_data
from safetensors.torch import save_file

from curvscope.errors import CurvscopeError
from curvscope.io.load import load_problem


def _evil_checkpoint(path: Path, spec: str, kwargs: dict) -> Path:
    state = {k: v.contiguous() for k, v in tiny_mlp().state_dict().items()}
    save_file(state, str(path), metadata={"curvscope.model": spec, "curvscope.model_kwargs": json.dumps(kwargs)})
    return path


@pytest.mark.parametrize("spec, kwargs", [
    ("subprocess:check_call", {"args": "touch {marker}", "shell": True}),
    ("os:system", {"command": "touch {marker}"}),
    ("{payload}:f", {}),
])
def test_checkpoint_metadata_cannot_run_code(tmp_path, tiny_data, spec, kwargs):
    marker = tmp_path / "marker"
    payload = tmp_path / "payload.py"
    payload.write_text(f"open({str(marker)!r}, 'w').close()\n"
                       "def f():\n    import torch\n    return torch.nn.Linear(4, 3)\n")
    spec = spec.format(payload=payload)
    kwargs = {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in kwargs.items()}
    ckpt = _evil_checkpoint(tmp_path / "evil.safetensors", spec, kwargs)
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    for command in ("info", "spectrum"):
        result = invoke(command, ckpt, "--data", data, *(["-o", tmp_path / "o"] if command != "info" else []))
        err = assert_clean_error(result, "asks to import and run", "--trust-model-code")
        assert spec in err
        assert not marker.exists(), f"{command} ran the checkpoint's code"
    with pytest.raises(CurvscopeError, match="trust_model_code=True"):
        load_problem(ckpt, data)
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_trusted_and_builtin_models_load(tmp_path, tiny_data):
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    builtin = _evil_checkpoint(tmp_path / "ok.safetensors", "mlp", TINY_KWARGS)
    assert invoke("info", builtin, "--data", data).exit_code == 0  # curvscope's own models need no consent
    factory = tmp_path / "net.py"
    factory.write_text("from curvscope.models import mlp\n"
                       "def f(**kw):\n    return mlp(4, [5], 3, activation='tanh')\n")
    ckpt = _evil_checkpoint(tmp_path / "user.safetensors", f"{factory}:f", {})
    assert invoke("info", ckpt, "--data", data).exit_code == 2
    result = invoke("info", ckpt, "--data", data, "--trust-model-code")
    assert result.exit_code == 0, result.stderr
    result = invoke("info", ckpt, "--data", data, "--model", f"{factory}:f")  # named by the user: trusted
    assert result.exit_code == 0, result.stderr


def test_config_model_needs_consent(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    marker = tmp_path / "marker"
    payload = tmp_path / "payload.py"
    payload.write_text(f"open({str(marker)!r}, 'w').close()\ndef f():\n    return None\n")
    config = tmp_path / "ci.toml"
    config.write_text(f'rules = ["loss_value < 9"]\n[problem]\nmodel = "{payload}:f"\n')
    result = invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "o")
    assert_clean_error(result, "[problem] model", "asks to import and run", "--trust-model-code")
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_checkpoint_is_refused_at_once(tmp_path, tiny_data):
    fifo = tmp_path / "ckpt.safetensors"
    os.mkfifo(fifo)
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    assert_clean_error(invoke("info", fifo, "--data", data), "not a regular file")
    assert_clean_error(invoke("info", "--model", "mlp", "--model-kwargs", json.dumps(TINY_KWARGS), "--data", fifo),
                       "not a regular file")


def test_float64_checkpoint_stays_float64(tmp_path, tiny_data):
    from curvscope.io.checkpoints import save_checkpoint

    model = tiny_mlp().double()
    with torch.no_grad():  # digits beyond float32's precision must survive the load
        for p in model.parameters():
            p.add_(1e-12 * torch.randn_like(p))
    ckpt = tmp_path / "f64.safetensors"
    save_checkpoint(ckpt, model, model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="ce")
    x, y = tiny_data
    data = write_data(tmp_path / "d.safetensors", x.double(), y)
    problem = load_problem(ckpt, data, dtype="float64")
    for name, p in model.named_parameters():
        assert torch.equal(problem.params[name], p.detach()), name
    expected = torch.nn.functional.cross_entropy(model(x.double()), y)
    assert abs(float(problem.loss_value().detach()) - float(expected.detach())) < 1e-12
