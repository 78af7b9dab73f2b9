"""A batch held where it came from (host memory, a file read by rows, a Dataset): the streamed matrix-free products
move one chunk of samples at a time to the device, never the whole batch, with the numbers of the batch held on the
device and of a dense float64 reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_KWARGS, invoke, tiny_mlp
from helpers import flat_params, unflatten_params
from safetensors.torch import save_file
from test_sequence import TinyLM

from curvscope.curvature import finite
from curvscope.curvature.matfree import stream
from curvscope.curvature.matfree.spectrum import compute_matfree_spectrum
from curvscope.io import held
from curvscope.io.factory import from_object
from curvscope.io.sources import Source
from curvscope.problem import Problem, make_problem

N = 24


class Moves:
    """Spies on the problem: the most samples moved to the device at once, and whether a held batch was ever moved
    there whole (``Problem._resident`` on a batch not yet resident)."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        self.whole = 0
        prepare, resident = Problem._prepare, Problem._resident

        def spy_prepare(problem, x, y):
            self.sizes.append(int(y.shape[0]))
            return prepare(problem, x, y)

        def spy_resident(problem):
            self.whole += not problem.batch.resident
            return resident(problem)

        monkeypatch.setattr(Problem, "_prepare", spy_prepare)
        monkeypatch.setattr(Problem, "_resident", spy_resident)


def data(seed: int = 4, n: int = N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.arange(n) % 3


def dense_hessian(problem):
    theta = flat_params(problem)
    return torch.autograd.functional.hessian(lambda t: problem.loss_value(unflatten_params(problem, t)), theta)


def test_tensors_of_hold_bytes_or_more_are_held_and_stream_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr(held, "HOLD_BYTES", 1)
    x, y = data()
    problem = make_problem(tiny_mlp(seed=2), x, y, loss="ce", dtype=torch.float64, device="cpu")
    assert problem.held and problem.batch_size == N and isinstance(problem.batch.held, held.HostBatch)
    moves = Moves(monkeypatch)
    kw = {"curvature": "hessian", "top_k": 2, "trace_matvecs": 20, "density_vectors": 1, "seed": 3}
    streamed = compute_matfree_spectrum(problem, chunk_size=7, **kw)
    assert problem.held and moves.whole == 0 and max(moves.sizes) == 7
    eig = torch.linalg.eigvalsh(dense_hessian(problem))  # the reference moves the batch to the device
    torch.testing.assert_close(streamed.groups[0].top, eig.flip(0)[:2], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(streamed.groups[0].bottom, eig[:2], rtol=1e-8, atol=1e-10)
    monkeypatch.undo()
    whole = compute_matfree_spectrum(make_problem(tiny_mlp(seed=2), x, y, loss="ce", dtype=torch.float64,
                                                  device="cpu"), **kw)
    assert streamed.loss_value == pytest.approx(whole.loss_value, rel=1e-13)
    assert streamed.groups[0].trace == pytest.approx(whole.groups[0].trace, rel=1e-9)


def test_a_held_sequence_batch_keeps_the_whole_batch_token_normalization(monkeypatch):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(7, (9, 5), generator=g)
    labels = tokens.clone()
    labels[2, 3:] = -100
    labels[7, :4] = -100

    def build():
        torch.manual_seed(0)
        return make_problem(TinyLM(), tokens, labels, loss="ce", dtype=torch.float64, shift_labels=True)

    resident = build()
    monkeypatch.setattr(held, "HOLD_BYTES", 1)
    problem = build()
    assert problem.held and not resident.held
    assert problem.loss.token_scale == pytest.approx(resident.loss.token_scale, rel=1e-15)
    assert problem.num_tokens == resident.num_tokens
    ggn = compute_matfree_spectrum(problem, curvature="ggn", top_k=2, trace_matvecs=0, density_vectors=0,
                                   chunk_size=4)
    ref = compute_matfree_spectrum(resident, curvature="ggn", top_k=2, trace_matvecs=0, density_vectors=0)
    torch.testing.assert_close(ggn.groups[0].top, ref.groups[0].top, rtol=1e-9, atol=1e-12)
    assert problem.held  # nothing asked for the whole batch


class Items(torch.utils.data.Dataset):
    """A map-style Dataset that counts its reads; ``noise``: a random 'augmentation' on every read."""

    def __init__(self, noise: bool = False):
        self.x, self.y = data(seed=6, n=30)
        self.noise, self.reads = noise, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        x = self.x[i] + (0.1 * torch.randn(4) if self.noise else 0)
        return x, self.y[i]


def test_a_dataset_is_read_and_collated_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr(held, "HOLD_BYTES", 1)
    dataset = Items()
    source = from_object(dataset, "<Items>")
    batch = held.hold_rows(source, torch.arange(30))
    assert isinstance(batch, held.SourceBatch)
    before = dataset.reads
    x, y = batch.read(10, 16)
    assert dataset.reads - before == 6 and torch.equal(x, dataset.x[10:16]) and torch.equal(y, dataset.y[10:16])
    random = held.hold_rows(from_object(Items(noise=True), "<Items>"), torch.arange(30))
    assert isinstance(random, held.HostBatch) and "change between reads" in random.note


def test_the_cli_holds_a_large_batch_and_moves_one_chunk_at_a_time(tmp_path, monkeypatch):
    """The CLI's spectrum over a held batch (and a further one, batches 2): every product, the loss, the gradient,
    the finite check and the GGN beside the Hessian see at most one chunk of samples on the device, and the report
    has the numbers of the batch held on the device whole."""
    x, y = data(seed=5)
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    args = ("spectrum", "--data", tmp_path / "d.safetensors", "--model", "mlp", "--model-kwargs",
            json.dumps(TINY_KWARGS), "--batch-size", 12, "--batches", 2, "--curvature", "hessian", "--top-k", 2,
            "--dtype", "float64", "--device", "cpu", "--no-plots", "--trace-samples", 10, "--density-vectors", 1)
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    monkeypatch.setattr(held, "HOLD_BYTES", 1)
    monkeypatch.setattr(stream, "plan_stream", lambda *a, **kw: stream.StreamPlan(5, 0))
    monkeypatch.setattr(finite, "CHUNK", 5)
    moves = Moves(monkeypatch)
    calls, real = [], Problem.call

    def spy(self, state, inputs):
        calls.append(inputs.shape[0])
        return real(self, state, inputs)

    monkeypatch.setattr(Problem, "call", spy)
    rows, read = [], Source.read

    def spy_read(source, indices, cached=True):
        rows.append(len(indices))
        return read(source, indices, cached)

    monkeypatch.setattr(Source, "read", spy_read)
    result = invoke(*args, "--out", tmp_path / "held")
    assert result.exit_code == 0, result.stderr
    assert moves.whole == 0 and max(moves.sizes) == 5 and max(calls) <= 5
    assert max(rows) <= 5  # the data is read and collated a chunk at a time too
    whole, streamed = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "held"))
    for key in ("loss_value", "gradient_norm"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-12)
    for mine, ref in zip(streamed["per_batch"], whole["per_batch"], strict=True):
        assert mine["batch_indices"] == ref["batch_indices"]
        assert mine["groups"][0]["lambda_max"] == pytest.approx(ref["groups"][0]["lambda_max"], rel=1e-9)
        assert mine["groups"][0]["trace"] == pytest.approx(ref["groups"][0]["trace"], rel=1e-9)
    assert any("read from the data a chunk at a time" in n for n in streamed["notes"])


def test_the_api_spectrum_takes_a_dataset_a_loader_or_batches_and_streams(monkeypatch):
    import curvscope
    from curvscope import CurvscopeError

    dataset = Items()
    x, y = dataset.x, dataset.y
    kw = {"loss": "ce", "curvature": "hessian", "top_k": 2, "trace_matvecs": 0, "density_vectors": 0,
          "dtype": torch.float64, "device": "cpu"}
    ref = curvscope.spectrum(tiny_mlp(seed=1), x, y, **kw)
    dense = torch.linalg.eigvalsh(dense_hessian(make_problem(tiny_mlp(seed=1), x, y, loss="ce",
                                                             dtype=torch.float64, device="cpu")))
    torch.testing.assert_close(ref.groups[0].top, dense.flip(0)[:2], rtol=1e-8, atol=1e-10)
    monkeypatch.setattr(held, "HOLD_BYTES", 1)
    monkeypatch.setattr(finite, "CHUNK", 6)
    moves = Moves(monkeypatch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    batches = iter([(x[i:i + 7], y[i:i + 7]) for i in range(0, 30, 7)])  # a list would be a Dataset of samples
    for data in (dataset, loader, batches):
        moves.sizes.clear()
        got = curvscope.spectrum(tiny_mlp(seed=1), data, chunk_size=6, **kw)
        torch.testing.assert_close(got.groups[0].top, ref.groups[0].top, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.groups[0].bottom, ref.groups[0].bottom, rtol=1e-9, atol=1e-12)
        assert got.loss_value == pytest.approx(ref.loss_value, rel=1e-12)
        assert moves.whole == 0 and max(moves.sizes) == 6
    with pytest.raises(CurvscopeError, match="chunk_size must be at least 1"):
        curvscope.spectrum(tiny_mlp(seed=1), dataset, chunk_size=0, **kw)
    with pytest.raises(CurvscopeError, match="chunk_size.*matrix-free"):
        curvscope.spectrum(tiny_mlp(seed=1), dataset, chunk_size=6, method="gram", loss="ce")
    with pytest.raises(CurvscopeError, match="targets are needed"):
        curvscope.spectrum(tiny_mlp(seed=1), x, loss="ce")
