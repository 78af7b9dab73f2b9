"""Hostile inputs and a hostile machine are bad input (exit 2, one line), never an internal error (exit 3): a full
disk or a file-size limit, absurd JSON, names too long for the file system, weights curvscope cannot use,
mislabelled data, a zero-loss problem, a memory budget larger than the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS, SAMPLES, TINY_KWARGS, assert_clean_error, invoke, tiny_mlp, write_data
from safetensors.torch import save_file

from curvscope.io.checkpoints import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _state():
    return {k: v.contiguous() for k, v in tiny_mlp().state_dict().items()}


def test_a_file_size_limit_while_writing_is_exit_2_and_leaves_nothing(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out" / "deeper"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000)); "
            "sys.argv = ['curvscope'] + sys.argv[1:]; from curvscope.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "spectrum", str(ckpt), "--data", str(data), "-o", str(out),
                           "--eigenvectors", str(tmp_path / "out" / "ev.safetensors")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "File too large" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").rglob("*"))


def test_a_full_disk_while_writing_is_exit_2_and_changes_nothing(tmp_path, tiny_files, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert_clean_error(invoke("spectrum", ckpt, "--data", data, "-o", out), "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file, nothing replaced
    assert_clean_error(invoke("spectrum", ckpt, "--data", data, "-o", tmp_path / "new" / "o"), "No space")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("text, needle", [("[" * 5000 + "]" * 5000, "nested too deeply"),
                                          ('{"hidden": ' + "9" * 5000 + "}", "4300 digits")])
def test_absurd_json_in_checkpoint_metadata_and_hf_config(tmp_path, tiny_data, text, needle):
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    ckpt = tmp_path / "k.safetensors"
    save_file(_state(), str(ckpt), metadata={"curvscope.model": "mlp", "curvscope.model_kwargs": text})
    assert_clean_error(invoke("info", ckpt, "--data", data), "curvscope.model_kwargs", needle)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(_state(), str(hf / "model.safetensors"))
    (hf / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "n_embd": ' + text + "}")
    assert_clean_error(invoke("info", hf, "--data", data), "config.json", needle)


def test_an_architectures_entry_that_is_not_a_list_of_names(tmp_path, tiny_data):
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(_state(), str(hf / "model.safetensors"))
    for architectures in ({"GPT2LMHeadModel": 1}, [{"name": "GPT2LMHeadModel"}], "GPT2LMHeadModel", 3):
        (hf / "config.json").write_text(json.dumps({"architectures": architectures}))
        assert_clean_error(invoke("info", hf, "--data", data), "architectures")


def test_names_too_long_for_the_file_system(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    long = "a" * 300
    for args in (("-o", tmp_path / long), ("-o", tmp_path / "x" / long / "y"),
                 ("-o", tmp_path / "o", "--eigenvectors", tmp_path / (long + ".safetensors"))):
        assert_clean_error(invoke("spectrum", ckpt, "--data", data, *args), "longer than the file system allows")
    assert_clean_error(invoke("check", ckpt, "--data", data, "-r", "loss_value < 9", "-o", tmp_path / long),
                       "longer than the file system allows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.safetensors", "tiny.safetensors"]


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "complex64", "qint8", "uint8"])
def test_weights_curvscope_cannot_use_are_refused(tmp_path, tiny_data, dtype):
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    state = _state()
    name = next(k for k in state if k.endswith("weight"))
    if dtype == "qint8":
        state[name] = torch.quantize_per_tensor(state[name], 0.1, 0, torch.qint8)
        path = tmp_path / "q.pt"
        torch.save(state, path)
        args = ("--model", "mlp", "--model-kwargs", json.dumps(TINY_KWARGS))
    else:
        state[name] = state[name].to(getattr(torch, dtype))
        path = tmp_path / "q.safetensors"
        save_file(state, str(path), metadata={"curvscope.model": "mlp",
                                              "curvscope.model_kwargs": json.dumps(TINY_KWARGS)})
        args = ()
    assert_clean_error(invoke("info", path, "--data", data, *args), name, dtype)


def test_npy_data_named_npz(tmp_path, tiny_files, tiny_data):
    ckpt, _, _ = tiny_files
    np.save(tmp_path / "x.npy", tiny_data[0].numpy())
    (tmp_path / "x.npy").rename(tmp_path / "x.npz")
    assert_clean_error(invoke("info", ckpt, "--data", tmp_path / "x.npz"), "single .npy array")
    (tmp_path / "t.npz").write_text("x,y\n1,2\n")
    assert_clean_error(invoke("info", ckpt, "--data", tmp_path / "t.npz"), "not a valid .npz")


def test_a_zero_loss_problem_draws_its_plots(tmp_path):
    model = tiny_mlp()
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)  # the model fits its targets exactly: loss and gradient are zero
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model, model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="mse")
    data = write_data(tmp_path / "d.safetensors", x, y)
    out = tmp_path / "o"
    result = invoke("spectrum", ckpt, "--data", data, "-o", out, "--newton-step", tmp_path / "s.safetensors",
                    "--landscape")
    assert result.exit_code == 0, result.stderr
    assert {"spectrum.png", "directions.png", "landscape.png"} <= {p.name for p in out.iterdir()}


def test_a_memory_budget_beyond_the_machine_is_planned_within_it(monkeypatch):
    from curvscope.curvature import memory
    from curvscope.curvature.method import choose_method
    from curvscope.io.load import load_problem

    monkeypatch.setattr(memory, "available_memory", lambda device: 256 * 2**20)
    problem = load_problem(SAMPLES / "mlp-digits.safetensors", DIGITS, batch_size=1797)
    plan = choose_method(problem, max_memory=2**40)  # 1 TiB asked; the Gram needs 2.4 GiB
    assert plan.method == "lanczos" and plan.budget == 256 * 2**20
    assert "256 MiB available" in plan.note and "1 TiB asked for" in plan.note
    result = invoke("spectrum", SAMPLES / "mlp-digits.safetensors", "--data", DIGITS, "-n", "1797",
                    "--max-memory", "1TB", "--method", "gram")
    assert_clean_error(result, "--max-memory", "available")
