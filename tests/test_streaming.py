"""Matrix-free curvature over many samples: the batch streams through every product in chunks (one chunk's graph in
memory), with the numbers of the whole-batch operator and of a dense reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_KWARGS, invoke, tiny_mlp
from helpers import dense_ggn, flat_params, unflatten_params
from safetensors.torch import save_file

from curvscope.curvature.matfree import stream
from curvscope.curvature.matfree.spectrum import compute_matfree_spectrum
from curvscope.curvature.matfree.stream import streamed_gradient, streamed_loss, streamed_operator
from curvscope.problem import make_problem

N = 30


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(N, 4, generator=g), torch.arange(N) % 3
    return make_problem(tiny_mlp(seed=2), x, y, loss="ce", dtype=torch.float64, device="cpu")


def dense_hessian(problem):
    theta = flat_params(problem)
    return torch.autograd.functional.hessian(lambda t: problem.loss_value(unflatten_params(problem, t)), theta)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_streamed_operator_is_the_dense_matrix(problem, curvature):
    seen = []
    op = streamed_operator(problem, curvature=curvature, chunk=7, progress=lambda s, d, t: seen.append((s, d)))
    dense = dense_hessian(problem) if curvature == "hessian" else dense_ggn(problem)
    eye = torch.eye(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op @ eye, dense, rtol=1e-10, atol=1e-12)
    assert seen[-1] == ("samples", N * op.dim) and seen[0] == ("samples", 7)  # 5 chunks per product
    assert streamed_loss(problem, 7) == pytest.approx(float(problem.loss_value()), rel=1e-13)
    for name, g in problem.gradient().items():
        torch.testing.assert_close(streamed_gradient(problem, 7)[name], g, rtol=1e-12, atol=1e-14)


def test_the_streamed_spectrum_equals_the_whole_batch_one(problem):
    kw = {"curvature": "hessian", "top_k": 2, "trace_matvecs": 20, "density_vectors": 1, "seed": 3}
    whole = compute_matfree_spectrum(problem, **kw)
    chunked = compute_matfree_spectrum(problem, chunk_size=8, **kw)
    torch.testing.assert_close(chunked.groups[0].top, whole.groups[0].top, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.groups[0].bottom, whole.groups[0].bottom, rtol=1e-9, atol=1e-12)
    assert chunked.groups[0].trace == pytest.approx(whole.groups[0].trace, rel=1e-9)
    assert chunked.loss_value == pytest.approx(whole.loss_value, rel=1e-13)


def test_the_cli_streams_a_batch_whose_graph_does_not_fit(tmp_path, monkeypatch):
    """A sample's graph 'weighs' 1 GiB here: the 64 MiB budget takes chunks of 1 sample, and no product ever runs
    on more; the report's numbers are those of the whole-batch operator."""
    g = torch.Generator().manual_seed(5)
    save_file({"x": torch.randn(12, 4, generator=g), "y": torch.arange(12) % 3}, str(tmp_path / "d.safetensors"))
    args = ("spectrum", "--data", tmp_path / "d.safetensors", "--model", "mlp", "--model-kwargs",
            json.dumps(TINY_KWARGS), "--batch-size", 12, "--curvature", "hessian", "--top-k", 2, "--dtype",
            "float64", "--device", "cpu", "--no-plots", "--max-memory", "64MiB", "--trace-samples", 10)
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    monkeypatch.setattr(stream, "graph_bytes_per_sample", lambda *a, **kw: float(2**30))
    from curvscope.problem import Problem

    sizes, real = [], Problem.call

    def spy(self, state, inputs):
        if torch.is_grad_enabled():
            sizes.append(inputs.shape[0])
        return real(self, state, inputs)

    monkeypatch.setattr(Problem, "call", spy)
    result = invoke(*args, "--out", tmp_path / "streamed")
    assert result.exit_code == 0, result.stderr
    assert sizes and max(sizes) == 1  # every graph of one sample
    whole, streamed = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "streamed"))
    assert streamed["groups"][0]["lambda_max"] == pytest.approx(whole["groups"][0]["lambda_max"], rel=1e-9)
    assert streamed["gradient_norm"] == pytest.approx(whole["gradient_norm"], rel=1e-12)
    assert any("streamed through every product in chunks of 1" in n and "samples/s" in n for n in streamed["notes"])


def test_a_samples_graph_counts_neither_the_model_nor_a_tensor_twice():
    """A wide linear layer on a few inputs: the graph per sample is the inputs, logits and softmax a sample saves
    (a few KB), not the 8 MB weight that autograd also saves (the model is held anyway), and a tensor saved by several
    nodes counts once; the budget then holds the whole batch's graph."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(1000, 1000)
    x, y = torch.randn(4, 1000, generator=g), torch.arange(4)
    problem = make_problem(model, x, y, loss="ce", dtype=torch.float64, device="cpu")
    per_sample = stream.graph_bytes_per_sample(problem, "hessian")
    weight = 1000 * 1000 * 8
    assert 0 < per_sample < weight / 100
    # every saved storage, once: at least one sample's input and logits, at most a few such rows per node
    assert per_sample >= 2 * 1000 * 8
    plan = stream.plan_stream(problem, "hessian", max_memory=2**24)
    assert plan.chunk is None and plan.graph_bytes == pytest.approx(per_sample * stream.WORK_FACTOR * 4, rel=1e-6)


def test_a_graph_over_its_share_streams_and_the_vectors_get_the_rest(problem, monkeypatch):
    """The vectors' budget is what the graph leaves; a large model's graph may take all but its eigensolver's
    vectors (graph_room), a small model's a third of the budget."""
    from types import SimpleNamespace

    from curvscope.curvature.matfree.lean import LEAN_VECTORS
    from curvscope.curvature.matfree.spectrum import vector_budget
    from curvscope.curvature.matfree.stream import graph_room
    from curvscope.curvature.method import LARGE_MODEL_PARAMS

    monkeypatch.setattr(stream, "graph_bytes_per_sample", lambda *a, **kw: 1000.0)
    budget = 30 * 3000  # a third holds 10 samples of 3000 bytes (WORK_FACTOR 3)
    third = stream.plan_stream(problem, "hessian", max_memory=budget)
    assert (third.chunk, third.graph_bytes) == (10, 30000)
    wide = stream.plan_stream(problem, "hessian", max_memory=budget, beside=budget // 10)
    assert (wide.chunk, wide.graph_bytes) == (27, 81000)
    assert stream.plan_stream(problem, "hessian", max_memory=10**6).chunk is None  # all 30 samples fit
    dims = [problem.num_params]
    assert vector_budget(problem, budget, dims, graph_bytes=30000) == budget - 30000 - 8 * problem.num_params
    assert vector_budget(problem, budget, dims) == budget - 3 * 8 * problem.num_params
    assert graph_room(problem) is None
    large = SimpleNamespace(num_params=LARGE_MODEL_PARAMS + 1, dtype=torch.float32)
    assert graph_room(large) == (LEAN_VECTORS + 1) * (LARGE_MODEL_PARAMS + 1) * 4
