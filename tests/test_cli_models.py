"""Models people bring, through the CLI: a Hugging Face GPT-2 and BERT directory as saved, and the bundled
language model; eigenvalues, trace and rank against a dense float64 reference built without vmap (PyTorch's
own loss, plain autograd Jacobians)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLES, invoke
from helpers import DenseAny
from torch import nn

from curvscope.io.inputs import call_model
from curvscope.io.load import load_problem

transformers = pytest.importorskip("transformers")
from test_hf import bert, gpt2, token_file  # noqa: E402


def _dense_eigenvalues(problem, batch_loss) -> torch.Tensor:
    """The nonzero GGN eigenvalues from the Jacobian of the raw model outputs (plain autograd, one backward pass
    per output, no vmap) and the Hessian of PyTorch's own loss on them."""
    names = list(problem.params)
    sizes = [problem.params[n].numel() for n in names]
    flat = torch.cat([problem.params[n].reshape(-1) for n in names])

    def outputs(theta):
        parts = {n: t.reshape(problem.params[n].shape) for n, t in zip(names, theta.split(sizes), strict=True)}
        return call_model(problem.model, {**problem.buffers, **parts}, problem.inputs, problem.output)

    with torch.no_grad():
        out = outputs(flat)
    N, O = out.shape[0], out[0].numel()
    J = torch.autograd.functional.jacobian(outputs, flat, vectorize=False).reshape(N, O, flat.numel())
    H = torch.autograd.functional.hessian(batch_loss, out).reshape(N * O, N * O)
    dense = DenseAny(J, H, torch.zeros(N, O, dtype=out.dtype))
    evals, _ = dense.eigen()
    return evals


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_gpt2_directory_through_the_cli_matches_the_dense_reference(tmp_path):
    gpt2(tmp_path / "gpt2")
    data = tmp_path / "tokens.safetensors"
    token_file(data, labels=lambda ids: ids)  # labels = input_ids; the directory's LM head shifts them
    out = tmp_path / "out"
    result = invoke("spectrum", tmp_path / "gpt2", "--data", data, "--dtype", "float64", "-o", out, "--no-plots")
    assert result.exit_code == 0, result.stderr
    report = _report(out)
    assert report["problem"]["shift_labels"] is True and report["problem"]["positions"] == 6
    problem = load_problem(tmp_path / "gpt2", data, dtype="float64")
    targets = problem.targets.reshape(problem.batch_size, -1)

    def hf_loss(logits):  # Hugging Face's causal-LM loss on the raw (N, T, V) logits
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           targets[:, :-1].reshape(-1), ignore_index=-100)

    ref = _dense_eigenvalues(problem, hf_loss)
    g = report["groups"][0]
    got = torch.tensor(g["eigenvalues"], dtype=torch.float64)
    assert g["rank"] == ref.numel()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10 * float(ref[0]))
    assert g["trace"] == pytest.approx(float(ref.sum()), rel=1e-6)


def test_bert_classifier_directory_through_the_cli(tmp_path):
    bert(tmp_path / "bert")
    data = tmp_path / "tokens.safetensors"
    token_file(data, labels=lambda ids: ids[:, 0] % 3)
    out = tmp_path / "out"
    result = invoke("spectrum", tmp_path / "bert", "--data", data, "--dtype", "float64", "-o", out, "--no-plots")
    assert result.exit_code == 0, result.stderr
    problem = load_problem(tmp_path / "bert", data, dtype="float64")
    ref = _dense_eigenvalues(problem, lambda logits: nn.functional.cross_entropy(logits, problem.targets))
    g = _report(out)["groups"][0]
    assert g["rank"] == ref.numel()
    torch.testing.assert_close(torch.tensor(g["eigenvalues"], dtype=torch.float64), ref, rtol=1e-6,
                               atol=1e-10 * float(ref[0]))
    info = invoke("info", tmp_path / "bert", "--data", data)
    assert info.exit_code == 0 and "logits" in info.stdout


def test_bundled_language_model_through_every_command(tmp_path):
    ckpt, data = SAMPLES / "charlm-pysource.safetensors", SAMPLES / "pysource.safetensors"
    out = tmp_path / "out"
    common = ("--data", data, "-n", "8", "-o", out)
    result = invoke("spectrum", ckpt, *common, "--mc-samples", "1", "--no-plots")
    assert result.exit_code == 0, result.stderr
    assert _report(out)["groups"][0]["rank"] > 0
    assert invoke("lr-suggest", ckpt, *common, "--no-plot").exit_code == 0
    assert invoke("check", out, "-r", "lr.groups[*].recommended > 0", "-r", "groups[0].rank > 0").exit_code == 0


@pytest.mark.parametrize("name", ["lstm", "gru-seq-first", "rnn-bidirectional", "prelu", "branch-item", "squeeze"])
def test_models_vmap_cannot_trace_through_the_cli(tmp_path, name):
    from pathlib import Path

    import test_fallback
    from conftest import write_data

    factory, shape = test_fallback.MODELS[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(shape[0]) % test_fallback.C
    data = write_data(tmp_path / "d.safetensors", x, y)
    spec = f"{Path(test_fallback.__file__)}:{factory.__name__}"
    out = tmp_path / "out"
    result = invoke("spectrum", "--model", spec, "--data", data, "--dtype", "float64", "--no-ghost", "-o", out,
                    "--no-plots")
    assert result.exit_code == 0, result.stderr
    report = _report(out)
    assert report["path"].startswith("autograd"), report["path"]
    problem = load_problem(data=data, model=spec, dtype="float64")
    ref = _dense_eigenvalues(problem, lambda logits: nn.functional.cross_entropy(logits, problem.targets))
    g = report["groups"][0]
    assert g["rank"] == ref.numel()
    torch.testing.assert_close(torch.tensor(g["eigenvalues"], dtype=torch.float64), ref, rtol=1e-6,
                               atol=1e-10 * float(ref[0]))
    assert g["trace"] == pytest.approx(float(ref.sum()), rel=1e-6)
