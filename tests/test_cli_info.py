"""``curvscope info`` end to end, every bad input of issue 2 (exit 2, one line, no traceback), --version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS, ROOT, SAMPLES, TINY_KWARGS, assert_clean_error, invoke, tiny_mlp, write_data
from safetensors.torch import save_file

from curvscope import __version__
from curvscope.io.checkpoints import save_checkpoint

MLP = "curvscope.models:mlp"

USER_MODULE = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

def not_a_module():
    return "a string"

class OnlyOneSample(nn.Module):  # passes the 2-sample probe, breaks on the whole batch
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] > 2:
            raise RuntimeError("this model has a bug for batches")
        return self.lin(x)
"""


def test_info_on_a_tiny_checkpoint(tiny_files):
    ckpt, data, _ = tiny_files
    result = invoke("info", ckpt, "--data", data)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in ("Linear", "weight (5, 4), bias (5,)", "parameters (D)", "43", "outputs (C)", "ce",
                 "12 samples: the first 12 in file order", "batch accuracy", "cpu / float64", MLP):
        assert text in out, text
    assert result.stderr == ""


def test_info_reports_the_batch_loss_and_accuracy(tiny_files, tiny_data):
    ckpt, data, model = tiny_files
    x, y = tiny_data
    result = invoke("info", ckpt, "--data", data, "--batch-size", "7", "--dtype", "float64")
    assert result.exit_code == 0, result.stderr
    with torch.no_grad():
        out = model.double()(x[:7].double())
    loss = torch.nn.CrossEntropyLoss()(out, y[:7])
    acc = (out.argmax(1) == y[:7]).double().mean()
    assert f"{float(loss):.6g}" in result.stdout
    assert f"{float(acc):.2%}" in result.stdout
    assert "cpu / float64" in result.stdout


def test_info_shuffle_says_which_samples(tiny_files):
    ckpt, data, _ = tiny_files
    result = invoke("info", ckpt, "--data", data, "-n", "3", "--shuffle", "--seed", "4")
    assert result.exit_code == 0, result.stderr
    assert "3 samples: a random subset (seed 4)" in result.stdout


def test_info_on_a_sample_model():
    result = invoke("info", SAMPLES / "mlp-digits.safetensors", "--data", DIGITS)
    assert result.exit_code == 0, result.stderr
    for text in ("8,970", "(1797, 64)", "128 samples: the first 128 in file order", "batch accuracy"):
        assert text in result.stdout, text


# -- bad input ------------------------------------------------------------------------------------------

@pytest.fixture
def bad(tmp_path, tiny_files, tiny_data):
    """Files for the bad-input cases: name -> path."""
    ckpt, data, model = tiny_files
    x, y = tiny_data
    files = {"ckpt": ckpt, "data": data}
    raw = ckpt.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + raw[20:])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    draw = data.read_bytes()
    (tmp_path / "truncated-data.safetensors").write_bytes(draw[:-10])
    (tmp_path / "model.txt").write_text("weights")
    (tmp_path / "data.csv").write_text("1,2,3")
    save_file({"x": x}, str(tmp_path / "no-y.safetensors"))
    np.savez(tmp_path / "no-x.npz", inputs=x.numpy(), y=y.numpy())
    write_data(tmp_path / "short-y.pt", x, y[:11])
    nan_x = x.clone()
    nan_x[3, 0] = float("nan")
    write_data(tmp_path / "nan-x.safetensors", nan_x, y)
    inf_x = x.clone()
    inf_x[0, 0] = float("inf")
    write_data(tmp_path / "inf-x.npz", inf_x, y)
    write_data(tmp_path / "label-3.safetensors", x, torch.where(y == 2, 3, y))
    write_data(tmp_path / "label-neg.safetensors", x, torch.where(y == 0, -1, y))
    write_data(tmp_path / "float-y.safetensors", x, y.float())
    write_data(tmp_path / "y-shape.safetensors", x, torch.rand(12, 2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"curvscope.model": MLP, "curvscope.model_kwargs": __import__("json").dumps(TINY_KWARGS)}
    keys = dict(state)
    keys.pop("3.bias")
    keys["head.weight"] = torch.zeros(3, 5)
    save_file(keys, str(tmp_path / "keys.safetensors"), metadata=meta)
    shapes = dict(state)
    shapes["1.weight"] = torch.zeros(6, 4)
    save_file(shapes, str(tmp_path / "shapes.safetensors"), metadata=meta)
    nan_w = dict(state)
    nan_w["3.weight"] = nan_w["3.weight"].clone()
    nan_w["3.weight"][0, 0] = float("nan")
    save_file(nan_w, str(tmp_path / "nan-w.safetensors"), metadata=meta)
    torch.save(model, tmp_path / "pickled.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "orphan.safetensors", model, model_spec="nonexistent_cs_pkg:make")
    write_data(tmp_path / "y-range.safetensors", x, torch.full((12, 3), 1.5))
    write_data(tmp_path / "wide-x.safetensors", torch.randn(12, 5), y)
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 definitely not a zip")
    (tmp_path / "user_net.py").write_text(USER_MODULE)
    (tmp_path / "broken_net.py").write_text("raise ImportError('missing dependency xyz')\n")
    files["tmp"] = tmp_path
    return files


BAD_CASES = {
    # name: (args with {tmp}/{ckpt}/{data} placeholders, needles in the message)
    "missing checkpoint": (["{tmp}/nope.safetensors", "--data", "{data}"],
                           ["nope.safetensors", "checkpoint file not found"]),
    "missing data": (["{ckpt}", "--data", "{tmp}/nope.npz"], ["nope.npz", "data file not found"]),
    "checkpoint is a directory": (["{tmp}", "--data", "{data}"], ["is a directory"]),
    "truncated safetensors": (["{tmp}/truncated.safetensors", "--data", "{data}"],
                              ["truncated.safetensors", "not a valid safetensors file"]),
    "corrupt safetensors": (["{tmp}/corrupt.safetensors", "--data", "{data}"],
                            ["corrupt.safetensors", "not a valid safetensors file"]),
    "empty safetensors": (["{tmp}/empty.safetensors", "--data", "{data}"],
                          ["empty.safetensors", "not a valid safetensors file"]),
    "truncated data": (["{ckpt}", "--data", "{tmp}/truncated-data.safetensors"],
                       ["truncated-data.safetensors", "not a valid safetensors file"]),
    "corrupt torch file": (["{tmp}/corrupt.pt", "--data", "{data}", "--model", "mlp"],
                           ["corrupt.pt", "cannot be loaded as a weights-only torch file"]),
    "pickled module": (["{tmp}/pickled.pt", "--data", "{data}", "--model", "mlp"],
                       ["pickled.pt", "not a plain state dict"]),
    "unknown checkpoint type": (["{tmp}/model.txt", "--data", "{data}"],
                                ["model.txt", "unknown checkpoint file type '.txt'"]),
    "npz checkpoint": (["{tmp}/no-x.npz", "--data", "{data}"], ["no-x.npz", "unknown checkpoint file type"]),
    "unknown data type": (["{ckpt}", "--data", "{tmp}/data.csv"],
                          ["data.csv", "unknown data file type '.csv'"]),
    "y missing": (["{ckpt}", "--data", "{tmp}/no-y.safetensors"], ["no-y.safetensors", "'y' is missing"]),
    "x missing": (["{ckpt}", "--data", "{tmp}/no-x.npz"], ["no-x.npz", "'x' is missing", "found inputs, y"]),
    "x and y lengths differ": (["{ckpt}", "--data", "{tmp}/short-y.pt"],
                               ["short-y.pt", "'x' has 12 samples but 'y' has 11"]),
    "keys do not match": (["{tmp}/keys.safetensors", "--data", "{data}"],
                          ["keys.safetensors", "missing keys 3.bias", "unexpected keys head.weight"]),
    "shapes do not match": (["{tmp}/shapes.safetensors", "--data", "{data}"],
                            ["shapes.safetensors", "shape mismatches 1.weight (6, 4) vs model (5, 4)"]),
    "NaN in weights": (["{tmp}/nan-w.safetensors", "--data", "{data}"],
                       ["nan-w.safetensors", "weights '3.weight' contain NaN or Inf"]),
    "NaN in inputs": (["{ckpt}", "--data", "{tmp}/nan-x.safetensors"],
                      ["nan-x.safetensors", "inputs 'x' contain NaN or Inf"]),
    "Inf in inputs": (["{ckpt}", "--data", "{tmp}/inf-x.npz"],
                      ["inf-x.npz", "inputs 'x' contain NaN or Inf"]),
    "label too large": (["{ckpt}", "--data", "{tmp}/label-3.safetensors"],
                        ["label-3.safetensors", "class labels must lie in [0, 3)", "[0, 3]"]),
    "negative label": (["{ckpt}", "--data", "{tmp}/label-neg.safetensors"],
                       ["label-neg.safetensors", "[0, 3)", "[-1, 2]"]),
    "float targets with ce": (["{ckpt}", "--data", "{tmp}/float-y.safetensors", "--loss", "ce"],
                              ["float-y.safetensors", "loss 'ce' needs integer class labels"]),
    "target shape with mse": (["{ckpt}", "--data", "{tmp}/y-shape.safetensors", "--loss", "mse"],
                              ["y-shape.safetensors", "needs targets of shape (N, 3)", "(12, 2)"]),
    "target shape with bce": (["{ckpt}", "--data", "{tmp}/y-shape.safetensors", "--loss", "bce"],
                              ["y-shape.safetensors", "loss 'bce' needs targets of shape (N, 3)"]),
    "bce targets outside [0, 1]": (["{ckpt}", "--data", "{tmp}/y-range.safetensors", "--loss", "bce"],
                                   ["y-range.safetensors", "loss 'bce' needs targets in [0, 1]"]),
    "inputs the model cannot run on": (
        ["{ckpt}", "--data", "{tmp}/wide-x.safetensors"],
        ["wide-x.safetensors", "cannot run on inputs of shape (5,) per sample"]),
    "plain checkpoint without --model": (["{tmp}/plain.pt", "--data", "{data}"],
                                         ["plain.pt", "does not say which model", "--model SPEC"]),
    "metadata names an unbuildable model": (
        ["{tmp}/orphan.safetensors", "--data", "{data}", "--trust-model-code"],
        ["orphan.safetensors", "metadata names a model that cannot be built", "nonexistent_cs_pkg"]),
    "spec module does not import": (["--model", "nonexistent_cs_pkg.nets:make", "--data", "{data}"],
                                    ["nonexistent_cs_pkg.nets:make", "cannot import module"]),
    "spec file does not exist": (["--model", "{tmp}/missing_net.py:make", "--data", "{data}"],
                                 ["missing_net.py", "not found"]),
    "spec file fails to import": (["--model", "{tmp}/broken_net.py:make", "--data", "{data}"],
                                  ["broken_net.py", "ImportError: missing dependency xyz"]),
    "spec names no callable": (["--model", "{tmp}/user_net.py:nothing", "--data", "{data}"],
                               ["user_net.py:nothing", "'nothing' is not a callable"]),
    "spec returns no Module": (["--model", "{tmp}/user_net.py:not_a_module", "--data", "{data}"],
                               ["user_net.py:not_a_module", "returned str, not a torch.nn.Module"]),
    "spec without factory": (["--model", "resnet18", "--data", "{data}"], ["'resnet18'", "expected"]),
    "bad model kwargs JSON": (["{ckpt}", "--data", "{data}", "--model-kwargs", "{hidden: 3}"],
                              ["--model-kwargs", "not valid JSON"]),
    "unknown model kwarg": (["{ckpt}", "--data", "{data}", "--model-kwargs", '{"depth": 3}'],
                            ["bad keyword arguments", "depth"]),
    "unknown loss": (["{ckpt}", "--data", "{data}", "--loss", "hinge"], ["unknown loss 'hinge'"]),
    "unknown dtype": (["{ckpt}", "--data", "{data}", "--dtype", "float16"], ["--dtype 'float16'"]),
    "unknown device": (["{ckpt}", "--data", "{data}", "--device", "tpu"], ["--device", "'tpu'"]),
    "no data": (["{ckpt}"], ["no data", "--data"]),
    "no model": (["--data", "{data}"], ["no model", "--model"]),
    "rich markup in a path": (["{tmp}/weird[/bold]name.safetensors", "--data", "{data}"],
                              ["weird[/bold]name.safetensors", "checkpoint file not found"]),
}


def fill(args: list[str], files: dict) -> list[str]:
    """Replace the {tmp}, {ckpt} and {data} placeholders (JSON arguments are left alone)."""
    out = []
    for arg in args:
        for key in ("tmp", "ckpt", "data"):
            arg = arg.replace("{" + key + "}", str(files[key]))
        out.append(arg)
    return out


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_gives_one_clean_line(bad, case):
    args, needles = BAD_CASES[case]
    args = fill(args, bad)
    result = invoke("info", *args)
    assert_clean_error(result, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_gpu(tiny_files, device):
    ckpt, data, _ = tiny_files
    assert_clean_error(invoke("info", ckpt, "--data", data, "--device", device), f"--device {device}",
                       "no CUDA GPU")


def test_a_bug_in_the_model_is_an_internal_error(bad):
    result = invoke("info", "--model", f"{bad['tmp']}/user_net.py:OnlyOneSample", "--data", bad["data"])
    err = assert_clean_error(result, "RuntimeError: this model has a bug for batches", "--debug", code=3)
    assert __version__ in err


def test_debug_shows_the_traceback(bad):
    result = invoke("info", bad["tmp"] / "truncated.safetensors", "--data", bad["data"], "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "not a valid safetensors file" in result.stderr


# -- real processes -------------------------------------------------------------------------------------

def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CURVSCOPE_DEBUG"}
    env["COLUMNS"] = "60"  # a narrow terminal must not wrap the one-line error
    return subprocess.run([*args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def console_script() -> str:
    path = Path(sys.executable).parent / "curvscope"
    found = str(path) if path.exists() else shutil.which("curvscope")
    assert found, "the 'curvscope' console script is not installed next to this Python"
    return found


def test_subprocess_bad_inputs_print_no_traceback(bad):
    for args, needle in [
        (["info", str(bad["tmp"] / "truncated.safetensors"), "--data", str(bad["data"])],
         "not a valid safetensors file"),
        (["info", str(bad["ckpt"]), "--data", str(bad["tmp"] / "label-3.safetensors")],
         "class labels must lie in [0, 3)"),
    ]:
        proc = run(sys.executable, "-m", "curvscope", *args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: "), proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_subprocess_cuda_without_gpu(tiny_files):
    ckpt, data, _ = tiny_files
    proc = run(console_script(), "info", str(ckpt), "--data", str(data), "--device", "cuda")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda: no CUDA GPU is available on this machine (use --device cpu)"]


@pytest.mark.parametrize("how", ["module", "script"])
def test_version(how, tmp_path):
    command = [sys.executable, "-m", "curvscope"] if how == "module" else [console_script()]
    proc = run(*command, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"curvscope {__version__}"


def test_saved_checkpoint_is_self_describing_for_the_cli(tmp_path, tiny_data):
    """save_checkpoint + info with no --model: what users do with their own models."""
    path = tmp_path / "mine.safetensors"
    save_checkpoint(path, tiny_mlp(seed=9), model_spec=MLP, model_kwargs=TINY_KWARGS)
    data = write_data(tmp_path / "d.pt", *tiny_data)
    result = invoke("info", path, "--data", data)
    assert result.exit_code == 0, result.stderr
    assert "43" in result.stdout and "cpu / float64" in result.stdout


def test_a_parameter_name_means_one_flag_in_every_command():
    """The CLI names an OptionError's parameters with one table read from the typer options: it holds only if
    a name is the same flag (or argument) wherever it appears."""
    import typer.main

    from curvscope.cli import app

    seen: dict[str, tuple] = {}
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            spelling = (param.param_type_name, tuple(param.opts), tuple(param.secondary_opts))
            assert seen.setdefault(param.name, spelling) == spelling, (name, param.name, spelling, seen[param.name])


def test_option_errors_name_flags_on_the_command_line():
    from curvscope.cli.common import cli_message, flags
    from curvscope.errors import Metavar, OptionError

    name = flags()
    assert [name("top_k"), name("out_dir"), name("json_output"), name("checkpoint"), name("target")] == \
        ["--top-k", "--out", "--json", "CHECKPOINT", "TARGET"]
    assert [name("device", "cpu"), name("data", Metavar("FILE")), name("trust_model_code", True)] == \
        ["--device cpu", "--data FILE", "--trust-model-code"]
    assert [name("directions", False), name("directions", True), name("shuffle", False)] == \
        ["--no-directions", "--directions", "--no-shuffle"]
    assert name("path") == "path" and name("path", 3) == "path=3"  # no command's parameter: Python words
    error = OptionError("newton_step", lambda n: f"{n('newton_step')} needs {n('directions', True)}")
    assert str(error) == "newton_step needs directions=True"
    assert cli_message(error) == "--newton-step needs --directions"
    assert cli_message(OptionError("top_k", "must be at least 1")) == "--top-k must be at least 1"
