"""The bundled character-level language model: the model, its data, its documented numbers, and that curvscope's
per-token loss is PyTorch's cross-entropy on the next characters."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import SAMPLES
from test_samples import METRICS, documented, split

from curvscope.io.checkpoints import load_checkpoint
from curvscope.io.data import load_dataset
from curvscope.io.load import load_problem
from curvscope.models import char_lm

LM = SAMPLES / "charlm-pysource.safetensors"
TEXT = SAMPLES / "pysource.safetensors"


def test_char_lm_is_causal_and_vmappable():
    torch.manual_seed(0)
    model = char_lm(vocab=11, seq_len=6, dim=8, heads=2, depth=2).eval()
    x = torch.randint(0, 11, (3, 6))
    out = model(x)
    assert out.shape == (3, 6, 11)
    changed = x.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 11
    out2 = model(changed)
    torch.testing.assert_close(out2[:, :3], out[:, :3], rtol=0, atol=0)  # the past never sees the future
    assert (out2[:, 3:] - out[:, 3:]).abs().max() > 1e-4
    per_sample = torch.func.vmap(lambda s: model(s.unsqueeze(0))[0])(x)
    torch.testing.assert_close(per_sample, out)
    assert model(x[:, :4]).shape == (3, 4, 11)  # shorter sequences use the first positions


def test_data_is_as_documented():
    data = load_dataset(TEXT)
    vocab = json.loads(data.metadata["vocab"])
    assert len(vocab) == 60 and vocab[-1] == "~" and len(set(vocab)) == 60
    assert data.x.dtype == data.y.dtype == torch.int64 and data.x.shape == data.y.shape == (2110, 16)
    assert int(data.x.min()) >= 0 and int(data.x.max()) < 60
    torch.testing.assert_close(data.y[:, :-1], data.x[:, 1:])  # y is x one character on
    start, stop = split(data.metadata["test"])
    assert (start, stop) == (1899, 2110) and data.metadata["train"] == "0:1899"
    held_out = data.x[start:].reshape(-1)  # stored in text order: consecutive sequences continue each other
    torch.testing.assert_close(data.y[start:-1, -1], data.x[start + 1:, 0])
    text = "".join(vocab[i] for i in held_out.tolist())
    assert "def " in text or "return" in text


def test_lm_loads_and_its_loss_is_cross_entropy_on_the_next_characters():
    meta = load_checkpoint(LM).metadata
    assert meta["curvscope.model"] == "curvscope.models:char_lm" and meta["curvscope.loss"] == "ce"
    assert "curvscope.shift_labels" not in meta  # y already holds the next characters
    problem = load_problem(LM, TEXT, dtype="float64")
    assert problem.num_params == documented()["charlm-pysource"]["params"] == 21_564
    assert problem.batch_size == 128 and problem.info["batch_indices"] == list(range(128))
    assert problem.info["shift_labels"] is False and problem.info["output"] == "the output tensor"
    data = load_dataset(TEXT)
    model = char_lm(**json.loads(meta["curvscope.model_kwargs"])).double()
    model.load_state_dict(load_checkpoint(LM).state_dict)
    with torch.no_grad():
        logits = model(data.x[:128])
        expected = F.cross_entropy(logits.reshape(-1, 60), data.y[:128].reshape(-1))
        # the same on the inputs shifted by hand: the logits at t score character t + 1
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, 60), data.x[:128, 1:].reshape(-1), reduction="sum")
        last = F.cross_entropy(logits[:, -1], data.y[:128, -1], reduction="sum")
        torch.testing.assert_close((by_hand + last) / (128 * 16), expected)
        torch.testing.assert_close(problem.loss_value(), expected, rtol=1e-10, atol=1e-12)


def test_lm_reaches_its_documented_held_out_numbers():
    doc = documented()["charlm-pysource"]
    problem = load_problem(LM, TEXT)
    start, stop = split(load_checkpoint(LM).metadata["curvscope.test_split"])
    held_out = problem.batch_from_dataset(torch.arange(start, stop))
    with torch.no_grad():
        loss = float(held_out.loss_value())
        logits = held_out.model(held_out.inputs)
    accuracy = float((logits.argmax(-1) == held_out.targets).double().mean())
    assert abs(loss - METRICS["charlm-pysource"]["test_loss"]) < 1e-3
    assert abs(loss - doc["loss"]) < 1e-3 and abs(accuracy - doc["accuracy"]) < 1e-3
    assert loss < 2.2 and accuracy > 0.5  # far better than the 4.09 nats of guessing among 60 characters
