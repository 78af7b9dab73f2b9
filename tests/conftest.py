"""Shared test helpers: paths of the bundled samples, a CLI runner, and tiny files written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from curvscope.cli import app as _app  # noqa: F401  (every command registered: as_flags() knows every flag)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DIGITS = SAMPLES / "digits.safetensors"
DIABETES = SAMPLES / "diabetes.safetensors"

# Tests use tiny tensors, where thread start-up dominates: one thread keeps the suite fast on 2-core CI.
torch.set_num_threads(1)
SAMPLE_CHECKPOINTS = {
    "mlp-digits": DIGITS,
    "cnn-digits": DIGITS,
    "transformer-digits": DIGITS,
    "mlp-diabetes": DIABETES,
}


def invoke(*args: str):
    """Run ``curvscope ARGS`` in-process; returns click's Result (``stdout`` and ``stderr`` kept apart)."""
    from typer.testing import CliRunner

    from curvscope.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result, *needles: str, code: int = 2) -> str:
    """The command failed with ``code``: one line on stderr with every needle, no traceback, no stdout."""
    err = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:" if code == 2 else "internal error:"), err
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stdout == "", result.stdout
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def tiny_mlp(d_in: int = 4, hidden: int = 5, d_out: int = 3, seed: int = 0) -> nn.Module:
    """A tiny ``curvscope.models.mlp`` (tanh), seeded."""
    from curvscope.models import mlp

    torch.manual_seed(seed)
    return mlp(d_in, [hidden], d_out, activation="tanh")


TINY_KWARGS = {"in_features": 4, "hidden": [5], "out_features": 3, "activation": "tanh"}


def write_data(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    """Write a dataset file in the format its suffix names."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({"x": x.contiguous(), "y": y.contiguous()}, str(path))
    elif path.suffix == ".npz":
        import numpy as np

        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        torch.save({"x": x, "y": y}, path)
    return path


@pytest.fixture
def tiny_data():
    """(x, y): 12 samples of 4 float32 features, int64 labels in [0, 3) (every class present)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g)
    y = torch.arange(12) % 3
    return x, y


@pytest.fixture
def tiny_files(tmp_path, tiny_data):
    """A self-describing tiny checkpoint and its data file; returns (checkpoint, data, model)."""
    from curvscope.io.checkpoints import save_checkpoint

    model = tiny_mlp()
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, model, model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="ce")
    data = write_data(tmp_path / "data.safetensors", *tiny_data)
    return ckpt, data, model
